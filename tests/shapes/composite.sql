-- Shape "composite" (applied on top of deployed.sql): a tenant-scoped two-column FK from
-- the records to the master's (id, client_account_id).
SET search_path TO migration;
ALTER TABLE crewai_flow_state_extensions
    ADD CONSTRAINT uq_crewai_flow_state_extensions_id_client UNIQUE (id, client_account_id);
ALTER TABLE raw_import_records ADD CONSTRAINT fk_raw_import_records_master_tenant
    FOREIGN KEY (master_flow_id, client_account_id) REFERENCES crewai_flow_state_extensions (id, client_account_id);
