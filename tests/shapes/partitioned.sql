-- Shape "partitioned" (applied on top of deployed.sql): raw_import_records partitioned by
-- created_at (so its primary key includes created_at), two ranges and a default.
SET search_path TO migration;
DROP TABLE raw_import_records;
CREATE TABLE raw_import_records (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    data_import_id uuid NOT NULL,
    client_account_id uuid,
    engagement_id uuid,
    master_flow_id uuid,
    record_index integer NOT NULL,
    raw_data jsonb NOT NULL,
    created_at timestamptz DEFAULT now() NOT NULL,
    CONSTRAINT raw_import_records_pkey PRIMARY KEY (id, created_at),
    CONSTRAINT raw_import_records_data_import_id_fkey FOREIGN KEY (data_import_id)
        REFERENCES data_imports (id) ON DELETE CASCADE,
    CONSTRAINT raw_import_records_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (id)
) PARTITION BY RANGE (created_at);
CREATE TABLE raw_import_records_2025 PARTITION OF raw_import_records
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE raw_import_records_2026 PARTITION OF raw_import_records
    FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE raw_import_records_default PARTITION OF raw_import_records DEFAULT;
