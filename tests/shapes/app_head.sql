-- Shape H: what the application's own migrations (001 -> 157) build today, in schema
-- "migration". Facts: ../shared/PRODUCTION-SHAPES.md. No id has a server default; the
-- three master_flow_id FKs already reference flow_id (imports DEFERRABLE INITIALLY
-- DEFERRED, records NO ACTION under a truncated name, discovery flows CASCADE); the unique
-- constraint on flow_id carries nine other FKs; no convenience index on the records'
-- data_import_id or master_flow_id; RLS enabled (not forced) on three tables; the
-- application's own alembic_version lives beside them.
CREATE SCHEMA migration;
SET search_path TO migration;

DO $roles$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'application_role') THEN
    CREATE ROLE application_role NOLOGIN;
  END IF;
END $roles$;

CREATE TABLE alembic_version (
    version_num varchar(255) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
INSERT INTO alembic_version (version_num) VALUES ('157_add_decommission_indexes');

CREATE TABLE users (
    id uuid NOT NULL,
    email varchar(255) NOT NULL,
    CONSTRAINT users_pkey PRIMARY KEY (id)
);
INSERT INTO users (id, email) VALUES ('00000000-0000-4000-8000-00000000a11c', 'alice@example.com');

CREATE TABLE crewai_flow_state_extensions (
    id uuid NOT NULL,
    flow_id uuid NOT NULL,
    client_account_id uuid NOT NULL,
    engagement_id uuid NOT NULL,
    user_id varchar(255) NOT NULL,
    flow_type varchar(50) NOT NULL,
    flow_name varchar(255),
    flow_status varchar(50) DEFAULT 'initialized' NOT NULL,
    flow_configuration jsonb DEFAULT '{}'::jsonb NOT NULL,
    flow_persistence_data jsonb DEFAULT '{}'::jsonb NOT NULL,
    parent_flow_id uuid,
    collection_flow_id uuid,
    automation_tier varchar(20),
    phase_transitions jsonb DEFAULT '[]'::jsonb,
    error_history jsonb DEFAULT '[]'::jsonb,
    retry_count integer DEFAULT 0,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    CONSTRAINT crewai_flow_state_extensions_pkey PRIMARY KEY (id),
    CONSTRAINT uq_crewai_flow_state_extensions_flow_id UNIQUE (flow_id),
    CONSTRAINT chk_valid_flow_type CHECK (flow_type IN ('discovery', 'assessment', 'collection', 'planning',
        'execution', 'modernize', 'finops', 'observability', 'decommission')),
    CONSTRAINT fk_crewai_flow_state_extensions_parent_flow_id FOREIGN KEY (parent_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id)
);
CREATE INDEX ix_crewai_flow_state_extensions_tenant ON crewai_flow_state_extensions (client_account_id, engagement_id);
CREATE INDEX ix_crewai_flow_state_extensions_automation_tier ON crewai_flow_state_extensions (automation_tier);
CREATE INDEX ix_crewai_flow_state_extensions_collection_flow_id ON crewai_flow_state_extensions (collection_flow_id);

CREATE TABLE data_imports (
    id uuid NOT NULL,
    client_account_id uuid,
    engagement_id uuid,
    master_flow_id uuid,
    import_name varchar(255) NOT NULL,
    import_type varchar(50) NOT NULL,
    description text,
    filename varchar(255) NOT NULL,
    file_size integer,
    mime_type varchar(100),
    imported_by uuid NOT NULL,
    status varchar(20) DEFAULT 'pending',
    total_records integer DEFAULT 0,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz,
    CONSTRAINT data_imports_pkey PRIMARY KEY (id),
    CONSTRAINT data_imports_imported_by_fkey FOREIGN KEY (imported_by) REFERENCES users (id),
    CONSTRAINT fk_data_imports_master_flow_id_crewai_flow_state_extensions FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE raw_import_records (
    id uuid NOT NULL,
    data_import_id uuid NOT NULL,
    client_account_id uuid,
    engagement_id uuid,
    master_flow_id uuid,
    row_number integer NOT NULL,
    raw_data json NOT NULL,
    cleansed_data json,
    is_processed boolean DEFAULT false,
    is_valid boolean DEFAULT true,
    created_at timestamptz DEFAULT now(),
    CONSTRAINT raw_import_records_pkey PRIMARY KEY (id),
    CONSTRAINT raw_import_records_data_import_id_fkey FOREIGN KEY (data_import_id) REFERENCES data_imports (id),
    CONSTRAINT fk_raw_import_records_master_flow_id_crewai_flow_state__e097 FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id)
);
CREATE INDEX ix_raw_import_records_tenant ON raw_import_records (client_account_id, engagement_id);

CREATE TABLE discovery_flows (
    id uuid NOT NULL,
    flow_id uuid NOT NULL,
    master_flow_id uuid,
    data_import_id uuid,
    client_account_id uuid NOT NULL,
    engagement_id uuid NOT NULL,
    user_id varchar NOT NULL,
    flow_name varchar(255) NOT NULL,
    description text,
    status varchar(20) DEFAULT 'active' NOT NULL,
    progress_percentage double precision DEFAULT 0.0,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    CONSTRAINT discovery_flows_pkey PRIMARY KEY (id),
    CONSTRAINT discovery_flows_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id) ON DELETE CASCADE,
    CONSTRAINT discovery_flows_data_import_id_fkey FOREIGN KEY (data_import_id) REFERENCES data_imports (id)
);
CREATE INDEX ix_discovery_flows_id ON discovery_flows (id);
CREATE UNIQUE INDEX ix_discovery_flows_flow_id ON discovery_flows (flow_id);
CREATE INDEX ix_discovery_flows_master_flow_id ON discovery_flows (master_flow_id);
CREATE INDEX ix_discovery_flows_client_account_id ON discovery_flows (client_account_id);
CREATE INDEX ix_discovery_flows_engagement_id ON discovery_flows (engagement_id);
CREATE INDEX ix_discovery_flows_data_import_id ON discovery_flows (data_import_id);
CREATE INDEX ix_discovery_flows_status ON discovery_flows (status);
CREATE INDEX ix_discovery_flows_tenant ON discovery_flows (client_account_id, engagement_id);

-- The other tables that reference the master, all on flow_id (nine FKs with parent_flow_id).
CREATE TABLE collection_flows (
    id uuid NOT NULL,
    master_flow_id uuid,
    CONSTRAINT collection_flows_pkey PRIMARY KEY (id),
    CONSTRAINT collection_flows_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id) ON DELETE CASCADE
);
ALTER TABLE crewai_flow_state_extensions ADD CONSTRAINT fk_crewai_flow_state_extensions_collection_flow_id
    FOREIGN KEY (collection_flow_id) REFERENCES collection_flows (id) ON DELETE SET NULL;
CREATE TABLE assessment_flows (
    id uuid NOT NULL,
    master_flow_id uuid,
    CONSTRAINT assessment_flows_pkey PRIMARY KEY (id),
    CONSTRAINT assessment_flows_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id) ON DELETE CASCADE
);
CREATE TABLE planning_flows (
    id uuid NOT NULL,
    master_flow_id uuid,
    CONSTRAINT planning_flows_pkey PRIMARY KEY (id),
    CONSTRAINT planning_flows_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id) ON DELETE CASCADE
);
CREATE TABLE decommission_flows (
    id uuid NOT NULL,
    master_flow_id uuid NOT NULL,
    CONSTRAINT decommission_flows_pkey PRIMARY KEY (id),
    CONSTRAINT decommission_flows_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id)
);
CREATE TABLE agent_task_history (
    id uuid NOT NULL,
    flow_id uuid NOT NULL,
    CONSTRAINT agent_task_history_pkey PRIMARY KEY (id),
    CONSTRAINT agent_task_history_flow_id_fkey FOREIGN KEY (flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id) ON DELETE CASCADE,
    CONSTRAINT fk_agent_task_history_flow_id FOREIGN KEY (flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id)
);
CREATE TABLE assessments (
    id uuid NOT NULL,
    master_flow_id uuid,
    CONSTRAINT assessments_pkey PRIMARY KEY (id),
    CONSTRAINT assessments_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id)
);
CREATE TABLE import_field_mappings (
    id uuid NOT NULL,
    master_flow_id uuid,
    CONSTRAINT import_field_mappings_pkey PRIMARY KEY (id),
    CONSTRAINT import_field_mappings_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (flow_id)
);

-- Row-level security: enabled, not forced; tenant isolation for the application role and
-- a bypass for postgres.
ALTER TABLE crewai_flow_state_extensions ENABLE ROW LEVEL SECURITY;
ALTER TABLE data_imports ENABLE ROW LEVEL SECURITY;
ALTER TABLE discovery_flows ENABLE ROW LEVEL SECURITY;
CREATE POLICY crewai_flow_state_extensions_tenant_isolation ON crewai_flow_state_extensions TO application_role
    USING (client_account_id = current_setting('app.client_id', true)::uuid);
CREATE POLICY crewai_flow_state_extensions_superuser_bypass ON crewai_flow_state_extensions TO postgres USING (true);
CREATE POLICY data_imports_tenant_isolation ON data_imports TO application_role
    USING (client_account_id = current_setting('app.client_id', true)::uuid);
CREATE POLICY data_imports_superuser_bypass ON data_imports TO postgres USING (true);
CREATE POLICY discovery_flows_tenant_isolation ON discovery_flows TO application_role
    USING (client_account_id = current_setting('app.client_id', true)::uuid);
CREATE POLICY discovery_flows_superuser_bypass ON discovery_flows TO postgres USING (true);
