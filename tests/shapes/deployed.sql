-- Shape D: the deployed schema (mid-2025 production dump), in schema "migration".
-- Facts: ../shared/PRODUCTION-SHAPES.md. Ids have server defaults; flow_id has a UNIQUE
-- *index* (no constraint); imports and records reference the master's surrogate "id"
-- (imports ON DELETE CASCADE, records NO ACTION); discovery_flows has no FK on
-- master_flow_id; the records' position column is "record_index".
CREATE SCHEMA migration;
SET search_path TO migration;

CREATE TABLE users (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    email varchar(255) NOT NULL,
    CONSTRAINT users_pkey PRIMARY KEY (id)
);
INSERT INTO users (id, email) VALUES ('00000000-0000-4000-8000-00000000a11c', 'alice@example.com');

CREATE TABLE crewai_flow_state_extensions (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    flow_id uuid NOT NULL,
    client_account_id uuid NOT NULL,
    engagement_id uuid NOT NULL,
    user_id varchar(255) NOT NULL,
    flow_type varchar(50) NOT NULL,
    flow_name varchar(255),
    flow_status varchar(50) DEFAULT 'initialized' NOT NULL,
    flow_configuration jsonb DEFAULT '{}'::jsonb NOT NULL,
    flow_persistence_data jsonb DEFAULT '{}'::jsonb NOT NULL,
    agent_state jsonb,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    CONSTRAINT crewai_flow_state_extensions_pkey PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_crewai_flow_state_extensions_flow_id ON crewai_flow_state_extensions (flow_id);
CREATE INDEX ix_crewai_flow_state_extensions_client_account_id ON crewai_flow_state_extensions (client_account_id);

CREATE TABLE data_imports (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    client_account_id uuid,
    engagement_id uuid,
    master_flow_id uuid,
    import_name varchar(255) NOT NULL,
    import_type varchar(50) NOT NULL,
    filename varchar(255) NOT NULL,
    imported_by uuid NOT NULL,
    status varchar(50) DEFAULT 'pending',
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz,
    CONSTRAINT data_imports_pkey PRIMARY KEY (id),
    CONSTRAINT data_imports_imported_by_fkey FOREIGN KEY (imported_by) REFERENCES users (id),
    CONSTRAINT data_imports_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (id) ON DELETE CASCADE
);

CREATE TABLE raw_import_records (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    data_import_id uuid NOT NULL,
    client_account_id uuid,
    engagement_id uuid,
    master_flow_id uuid,
    record_index integer NOT NULL,
    raw_data jsonb NOT NULL,
    is_processed boolean DEFAULT false,
    created_at timestamptz DEFAULT now(),
    CONSTRAINT raw_import_records_pkey PRIMARY KEY (id),
    CONSTRAINT raw_import_records_data_import_id_fkey FOREIGN KEY (data_import_id)
        REFERENCES data_imports (id) ON DELETE CASCADE,
    CONSTRAINT raw_import_records_master_flow_id_fkey FOREIGN KEY (master_flow_id)
        REFERENCES crewai_flow_state_extensions (id)
);
CREATE INDEX ix_raw_import_records_data_import_id ON raw_import_records (data_import_id);

CREATE TABLE discovery_flows (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    flow_id uuid NOT NULL,
    master_flow_id uuid,
    data_import_id uuid,
    client_account_id uuid NOT NULL,
    engagement_id uuid NOT NULL,
    user_id varchar(255) NOT NULL,
    flow_name varchar(255) NOT NULL,
    status varchar(20) DEFAULT 'active',
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    CONSTRAINT discovery_flows_pkey PRIMARY KEY (id),
    CONSTRAINT discovery_flows_flow_id_key UNIQUE (flow_id),
    CONSTRAINT discovery_flows_data_import_id_fkey FOREIGN KEY (data_import_id) REFERENCES data_imports (id)
);
CREATE INDEX ix_discovery_flows_master_flow_id ON discovery_flows (master_flow_id);
