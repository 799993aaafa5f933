-- crackmap schema, version 3: road condition.
--   * crack typing (set when a scene is mapped) and road referencing (set by `crackmap sections`)
--     on cracks; concrete joints are typed 'joint', kept, and left out of every total;
--   * pattern_areas: alligator / block areas, published with their scene version;
--   * sections: per-section condition (10 m sections, 100 m and whole-road rollups), one
--     current run per survey (older runs stay, is_current false);
--   * section_changes, crack_changes: change between two surveys;
--   * views current_pattern_areas and current_sections.
-- The columns match pipeline/layers.py.

ALTER TABLE cracks
    ADD COLUMN crack_type text
        CHECK (crack_type IN ('longitudinal', 'transverse', 'diagonal', 'joint', 'pattern')),
    ADD COLUMN theta_deg double precision,
    ADD COLUMN chord_m double precision,
    ADD COLUMN tortuosity double precision,
    ADD COLUMN span_ratio double precision,
    ADD COLUMN pattern_no integer,
    ADD COLUMN road_id text,
    ADD COLUMN chainage_from_m double precision,
    ADD COLUMN chainage_to_m double precision,
    ADD COLUMN offset_m double precision;
-- `crackmap sections` sets the road columns (and the typing) of every crack of a survey in one
-- UPDATE; they are left unindexed so that it writes no more index entries than it must (reads
-- by road go through the sections layer; see benchmarks/sections.py).

-- the view's column list is fixed when it is created: add the new columns to it
CREATE OR REPLACE VIEW current_cracks AS
    SELECT c.*
    FROM cracks c
    JOIN scenes s USING (survey_id, scene_id, model_name, model_version)
    WHERE s.is_current;

CREATE TABLE pattern_areas (
    fid                     bigserial PRIMARY KEY,
    survey_id               text NOT NULL,
    scene_id                text NOT NULL,
    model_name              text NOT NULL,
    model_version           text NOT NULL,
    pattern_no              integer NOT NULL,
    class                   text NOT NULL CHECK (class IN ('alligator', 'block')),
    area_m2                 double precision NOT NULL,
    crack_density_m_per_m2  double precision NOT NULL,
    width_mean_mm           double precision,
    width_max_mm            double precision,
    severity                text CHECK (severity IN ('low', 'medium', 'high')),
    piece_m                 double precision,
    geom                    geometry(MultiPolygon, :srid) NOT NULL,
    UNIQUE (survey_id, scene_id, model_name, model_version, pattern_no),
    FOREIGN KEY (survey_id, scene_id, model_name, model_version) REFERENCES scenes ON DELETE CASCADE
);
CREATE INDEX pattern_areas_geom ON pattern_areas USING gist (geom);

CREATE VIEW current_pattern_areas AS
    SELECT a.*
    FROM pattern_areas a
    JOIN scenes s USING (survey_id, scene_id, model_name, model_version)
    WHERE s.is_current;

CREATE TABLE sections (
    fid                     bigserial PRIMARY KEY,
    survey_id               text NOT NULL,
    sections_run_id         text NOT NULL,
    road_id                 text NOT NULL,
    level                   text NOT NULL CHECK (level IN ('section', 'rollup', 'road')),
    from_m                  double precision NOT NULL,
    to_m                    double precision NOT NULL,
    section_m               double precision NOT NULL,
    network                 text,
    models                  text,
    computed_at             text NOT NULL,
    is_current              integer NOT NULL DEFAULT 1,
    longitudinal_m          double precision,
    transverse_m            double precision,
    diagonal_m              double precision,
    pattern_m               double precision,
    linear_low_m            double precision,
    linear_medium_m         double precision,
    linear_high_m           double precision,
    transverse_count        double precision,
    alligator_m2            double precision,
    block_m2                double precision,
    pattern_low_m2          double precision,
    pattern_medium_m2       double precision,
    pattern_high_m2         double precision,
    section_area_m2         double precision,
    imaged_area_m2          double precision,
    cracked_cells           double precision,
    coverage                double precision,
    crack_density_m_per_m2  double precision,
    cracked_area_pct        double precision,
    cracked_cells_pct       double precision,
    crack_index             double precision,
    condition_class         text,
    geom                    geometry(Polygon, :srid)
);
CREATE INDEX sections_geom ON sections USING gist (geom);
CREATE INDEX sections_survey ON sections (survey_id, is_current);
CREATE INDEX sections_road ON sections (road_id, level, from_m);

CREATE VIEW current_sections AS SELECT * FROM sections WHERE is_current = 1;

CREATE TABLE section_changes (
    fid                       bigserial PRIMARY KEY,
    from_survey               text NOT NULL,
    to_survey                 text NOT NULL,
    road_id                   text NOT NULL,
    level                     text NOT NULL,
    from_m                    double precision NOT NULL,
    to_m                      double precision NOT NULL,
    longitudinal_m_delta      double precision,
    transverse_m_delta        double precision,
    diagonal_m_delta          double precision,
    pattern_m_delta           double precision,
    alligator_m2_delta        double precision,
    block_m2_delta            double precision,
    transverse_count_delta    double precision,
    cracked_area_pct_delta    double precision,
    cracked_cells_pct_delta   double precision,
    crack_index_delta         double precision,
    class_from                text,
    class_to                  text,
    class_changed             integer,
    computed_at               text NOT NULL,
    geom                      geometry(Polygon, :srid)
);
CREATE INDEX section_changes_geom ON section_changes USING gist (geom);
CREATE INDEX section_changes_surveys ON section_changes (from_survey, to_survey);

CREATE TABLE crack_changes (
    fid             bigserial PRIMARY KEY,
    from_survey     text NOT NULL,
    to_survey       text NOT NULL,
    crack_id        text NOT NULL,
    survey_id       text NOT NULL,
    status          text NOT NULL CHECK (status IN ('new', 'grown', 'unchanged', 'gone')),
    length_m        double precision,
    length_delta_m  double precision,
    computed_at     text NOT NULL,
    geom            geometry(LineString, :srid)
);
CREATE INDEX crack_changes_geom ON crack_changes USING gist (geom);
CREATE INDEX crack_changes_surveys ON crack_changes (from_survey, to_survey);

GRANT SELECT ON pattern_areas, current_pattern_areas, sections, current_sections, section_changes,
    crack_changes, current_cracks TO crackmap_reader, crackmap_writer;
GRANT INSERT, UPDATE, DELETE ON pattern_areas, sections, section_changes, crack_changes TO crackmap_writer;
GRANT USAGE ON SEQUENCE pattern_areas_fid_seq, sections_fid_seq, section_changes_fid_seq, crack_changes_fid_seq
    TO crackmap_writer;
