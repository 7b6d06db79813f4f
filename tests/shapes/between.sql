-- Shape "between" (applied on top of deployed.sql): a database half-way through a fix done
-- by hand. The imports' FK already references flow_id (through the UNIQUE index, under a
-- name of its own); the records' FK still references id.
SET search_path TO migration;
ALTER TABLE data_imports DROP CONSTRAINT data_imports_master_flow_id_fkey;
ALTER TABLE data_imports ADD CONSTRAINT data_imports_master_flow_id_flow_fkey FOREIGN KEY (master_flow_id)
    REFERENCES crewai_flow_state_extensions (flow_id) ON DELETE SET NULL;
