-- crackmap schema, version 2: the cracks -> scenes foreign key, checked per statement.
--
-- A foreign key checks each inserted crack on its own (one index probe through the
-- executor per row): on a bulk load of a scene's cracks that was a third of the COPY's
-- time (benchmarks/store_bulk_load.py, docs/benchmarks.md).  The same rules hold here
-- with one set-based check per statement instead:
--   * cracks inserted or updated must have their scene row (survey, scene, model version);
--   * deleting scene rows deletes their cracks (what ON DELETE CASCADE did);
--   * changing a scene row's key while it has cracks is refused (NO ACTION).
-- As with a foreign key, the checks run as the table owner, whoever writes.

ALTER TABLE cracks DROP CONSTRAINT cracks_survey_id_scene_id_model_name_model_version_fkey;

CREATE FUNCTION crackmap_cracks_have_scenes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    orphan record;
BEGIN
    SELECT n.survey_id, n.scene_id, n.model_name, n.model_version INTO orphan
    FROM new_cracks n
    WHERE NOT EXISTS (SELECT FROM scenes s
                      WHERE (s.survey_id, s.scene_id, s.model_name, s.model_version)
                          = (n.survey_id, n.scene_id, n.model_name, n.model_version))
    LIMIT 1;
    IF FOUND THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('cracks of scene %s/%s (%s:%s) have no row in scenes',
                             orphan.survey_id, orphan.scene_id, orphan.model_name,
                             orphan.model_version),
            HINT = 'write the scene row first, in the same transaction';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER cracks_have_scenes_on_insert AFTER INSERT ON cracks
    REFERENCING NEW TABLE AS new_cracks
    FOR EACH STATEMENT EXECUTE FUNCTION crackmap_cracks_have_scenes();
CREATE TRIGGER cracks_have_scenes_on_update AFTER UPDATE ON cracks
    REFERENCING NEW TABLE AS new_cracks
    FOR EACH STATEMENT EXECUTE FUNCTION crackmap_cracks_have_scenes();

CREATE FUNCTION crackmap_scenes_delete_cracks() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    DELETE FROM cracks c USING old_scenes o
    WHERE (c.survey_id, c.scene_id, c.model_name, c.model_version)
        = (o.survey_id, o.scene_id, o.model_name, o.model_version);
    RETURN NULL;
END
$$;

CREATE TRIGGER scenes_delete_cracks AFTER DELETE ON scenes
    REFERENCING OLD TABLE AS old_scenes
    FOR EACH STATEMENT EXECUTE FUNCTION crackmap_scenes_delete_cracks();

CREATE FUNCTION crackmap_scenes_keep_keys() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF EXISTS (
        SELECT FROM (SELECT survey_id, scene_id, model_name, model_version FROM old_scenes
                     EXCEPT
                     SELECT survey_id, scene_id, model_name, model_version FROM new_scenes) gone
        WHERE EXISTS (SELECT FROM cracks c
                      WHERE (c.survey_id, c.scene_id, c.model_name, c.model_version)
                          = (gone.survey_id, gone.scene_id, gone.model_name, gone.model_version))) THEN
        RAISE foreign_key_violation USING
            MESSAGE = 'a scene row''s key cannot change while it has cracks';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER scenes_keep_keys AFTER UPDATE ON scenes
    REFERENCING OLD TABLE AS old_scenes NEW TABLE AS new_scenes
    FOR EACH STATEMENT EXECUTE FUNCTION crackmap_scenes_keep_keys();
