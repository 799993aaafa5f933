-- crackmap schema, version 1: surveys, models, runs, scenes, cracks and the current_cracks view.
-- Applied by pipeline.postgis.migrate (python -m pipeline.postgis migrate URL), which records it
-- in schema_migrations.  :srid is the store's EPSG code (4326 unless configured).

CREATE EXTENSION IF NOT EXISTS postgis;

CREATE TABLE surveys (
    survey_id   text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
    model_name     text NOT NULL,
    model_version  text NOT NULL,
    model_sha256   text NOT NULL,
    PRIMARY KEY (model_name, model_version)
);

CREATE TABLE runs (
    run_id         text PRIMARY KEY,
    survey_id      text NOT NULL REFERENCES surveys,
    model_name     text NOT NULL,
    model_version  text NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (model_name, model_version) REFERENCES models
);

-- One row per scene and model version; is_current marks the version whose cracks the
-- scene shows (at most one per survey and scene).
CREATE TABLE scenes (
    survey_id        text NOT NULL REFERENCES surveys,
    scene_id         text NOT NULL,
    model_name       text NOT NULL,
    model_version    text NOT NULL,
    model_sha256     text NOT NULL,
    run_id           text NOT NULL REFERENCES runs,
    source_uri       text NOT NULL,
    sha256           text,
    crs              text,
    width            integer,
    height           integer,
    chip_count       integer,
    crack_count      integer,
    total_length_m   double precision,
    status           text NOT NULL CHECK (status IN ('done', 'failed')),
    error            text,
    probability_uri  text,
    processed_at     timestamptz NOT NULL,
    is_current       boolean NOT NULL DEFAULT false,
    footprint        geometry(Polygon, :srid),
    PRIMARY KEY (survey_id, scene_id, model_name, model_version),
    FOREIGN KEY (model_name, model_version) REFERENCES models
);
CREATE UNIQUE INDEX scenes_one_current ON scenes (survey_id, scene_id) WHERE is_current;
CREATE INDEX scenes_footprint ON scenes USING gist (footprint);

CREATE TABLE cracks (
    crack_id         uuid PRIMARY KEY,
    survey_id        text NOT NULL,
    scene_id         text NOT NULL,
    model_name       text NOT NULL,
    model_version    text NOT NULL,
    model_sha256     text NOT NULL,
    run_id           text NOT NULL,
    length_m         double precision NOT NULL,
    width_mean_mm    double precision NOT NULL,
    width_max_mm     double precision NOT NULL,
    orientation_deg  double precision NOT NULL,
    confidence       double precision NOT NULL,
    severity         text NOT NULL CHECK (severity IN ('low', 'medium', 'high')),
    created_at       timestamptz NOT NULL,
    geom             geometry(LineString, :srid) NOT NULL,
    -- a scene's cracks go with its row; the scene row is written first in the same transaction
    FOREIGN KEY (survey_id, scene_id, model_name, model_version) REFERENCES scenes ON DELETE CASCADE
);
CREATE INDEX cracks_geom ON cracks USING gist (geom);
CREATE INDEX cracks_scene ON cracks (survey_id, scene_id, model_name, model_version);
CREATE INDEX cracks_model ON cracks (model_name, model_version);
CREATE INDEX cracks_severity ON cracks (severity);

-- Per scene, the cracks of its current model version.
CREATE VIEW current_cracks AS
    SELECT c.*
    FROM cracks c
    JOIN scenes s USING (survey_id, scene_id, model_name, model_version)
    WHERE s.is_current;

-- Roles (cluster-wide, so created only if absent): grant them to login users.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'crackmap_writer') THEN
        CREATE ROLE crackmap_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'crackmap_reader') THEN
        CREATE ROLE crackmap_reader NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO crackmap_writer, crackmap_reader;
GRANT SELECT ON surveys, models, runs, scenes, cracks, current_cracks, schema_migrations,
    spatial_ref_sys TO crackmap_reader, crackmap_writer;
GRANT INSERT, UPDATE, DELETE ON surveys, models, runs, scenes, cracks TO crackmap_writer;
