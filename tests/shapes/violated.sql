-- Shape "violated" (applied on top of deployed.sql): rows that break a VALID FK, as a bulk
-- restore with triggers off leaves them (session_replication_role = replica skips the
-- FK triggers). The records' FK stays marked valid.
SET search_path TO migration;
SET session_replication_role = replica;
INSERT INTO crewai_flow_state_extensions (id, flow_id, client_account_id, engagement_id, user_id, flow_type)
VALUES ('0000000a-0000-4000-8000-000000000001', '0000000a-0000-4000-8000-0000000000f1',
        '0000000c-0000-4000-8000-000000000001', '0000000e-0000-4000-8000-000000000001', 'restore', 'discovery');
INSERT INTO data_imports (id, client_account_id, engagement_id, master_flow_id, import_name, import_type,
                          filename, imported_by)
VALUES ('0000000b-0000-4000-8000-000000000001', '0000000c-0000-4000-8000-000000000001',
        '0000000e-0000-4000-8000-000000000001', '0000000a-0000-4000-8000-000000000001',
        'restored', 'csv', 'restored.csv', '00000000-0000-4000-8000-00000000a11c');
INSERT INTO raw_import_records (id, data_import_id, client_account_id, engagement_id, master_flow_id,
                                record_index, raw_data)
VALUES ('0000000d-0000-4000-8000-000000000001', '0000000b-0000-4000-8000-000000000001',
        '0000000c-0000-4000-8000-000000000001', '0000000e-0000-4000-8000-000000000001',
        '0000000a-0000-4000-8000-000000000001', 0, '{}'),
       -- these two point at masters that do not exist: the VALID FK does not hold for them
       ('0000000d-0000-4000-8000-000000000002', '0000000b-0000-4000-8000-000000000001',
        '0000000c-0000-4000-8000-000000000001', '0000000e-0000-4000-8000-000000000001',
        '0000dead-0000-4000-8000-000000000001', 1, '{}'),
       ('0000000d-0000-4000-8000-000000000003', '0000000b-0000-4000-8000-000000000001',
        '0000000c-0000-4000-8000-000000000001', '0000000e-0000-4000-8000-000000000001',
        '0000dead-0000-4000-8000-000000000002', 2, '{}');
SET session_replication_role = origin;
