-- crackmap schema, version 5: cracks' places on the road network in a table of their own.
--
-- `crackmap sections` used to set the road columns (and the network typing) of every crack of a
-- survey with one UPDATE of `cracks`.  In PostgreSQL an updated row is a new row version with new
-- entries in every index of the table (the GiST one included): for a million cracks that UPDATE
-- alone took longer than the whole target (benchmarks/sections.py, docs/benchmarks.md).  Now a
-- sections run replaces the survey's rows of `crack_positions` (one row per crack inside a road
-- corridor) with a binary COPY, and the views show them as crack columns:
--
--   crack_positions  road_id, chainage_from_m, chainage_to_m, offset_m, and the crack's typing
--                    against the road (crack_type, theta_deg, span_ratio)
--   cracks           what mapping wrote: typing against the scene's long axis, no road columns
--   all_cracks       every crack of every model version with its position (query() by version)
--   current_cracks   the current versions' cracks with their positions: the network typing where
--                    a crack is on a road, its mapping-time typing elsewhere; the columns of
--                    `cracks` in the order they had, road columns in the same places.
-- Publishing a scene drops the positions of the rows it replaces, as it drops the rows.

CREATE TABLE crack_positions (
    crack_id         uuid PRIMARY KEY,
    survey_id        text NOT NULL,
    road_id          text NOT NULL,
    chainage_from_m  double precision NOT NULL,
    chainage_to_m    double precision NOT NULL,
    offset_m         double precision NOT NULL,
    crack_type       text CHECK (crack_type IN ('longitudinal', 'transverse', 'diagonal', 'joint', 'pattern')),
    theta_deg        double precision,
    span_ratio       double precision
);
-- No index on survey_id: keeping one cost more on a million-row COPY than the PK itself; a survey's
-- rows are found through the cracks' index (see PostGISStore._put_positions).

INSERT INTO crack_positions
    SELECT crack_id, survey_id, road_id, chainage_from_m, chainage_to_m, offset_m, crack_type, theta_deg,
           span_ratio
    FROM cracks
    WHERE road_id IS NOT NULL AND chainage_from_m IS NOT NULL AND chainage_to_m IS NOT NULL
      AND offset_m IS NOT NULL;

DROP VIEW current_cracks;
ALTER TABLE cracks DROP COLUMN road_id, DROP COLUMN chainage_from_m, DROP COLUMN chainage_to_m,
    DROP COLUMN offset_m;

CREATE VIEW all_cracks AS
    SELECT c.crack_id, c.survey_id, c.scene_id, c.model_name, c.model_version, c.model_sha256, c.run_id,
           c.length_m, c.width_mean_mm, c.width_max_mm, c.orientation_deg, c.confidence, c.severity,
           c.created_at, c.geom,
           CASE WHEN p.crack_id IS NULL THEN c.crack_type ELSE p.crack_type END AS crack_type,
           CASE WHEN p.crack_id IS NULL THEN c.theta_deg ELSE p.theta_deg END AS theta_deg,
           c.chord_m, c.tortuosity,
           CASE WHEN p.crack_id IS NULL THEN c.span_ratio ELSE p.span_ratio END AS span_ratio,
           c.pattern_no, p.road_id, p.chainage_from_m, p.chainage_to_m, p.offset_m,
           c.gsd_mm, c.range_m, c.pos_accuracy_m, c.source_frames
    FROM cracks c
    LEFT JOIN crack_positions p ON p.crack_id = c.crack_id;

CREATE VIEW current_cracks AS
    SELECT c.*
    FROM all_cracks c
    JOIN scenes s USING (survey_id, scene_id, model_name, model_version)
    WHERE s.is_current;

GRANT SELECT ON crack_positions, all_cracks, current_cracks TO crackmap_reader, crackmap_writer;
GRANT INSERT, UPDATE, DELETE ON crack_positions TO crackmap_writer;

-- Deleting cracks (publishing a scene again, deleting a scene) deletes their positions, in one
-- set-based statement per statement, like migration 0002's checks.
CREATE FUNCTION crackmap_cracks_delete_positions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM old_cracks) THEN  -- a scene's first publication deletes nothing
        DELETE FROM crack_positions p USING old_cracks o WHERE p.crack_id = o.crack_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER cracks_delete_positions AFTER DELETE ON cracks
    REFERENCING OLD TABLE AS old_cracks
    FOR EACH STATEMENT EXECUTE FUNCTION crackmap_cracks_delete_positions();
