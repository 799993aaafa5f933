-- crackmap schema, version 4: what a crack mapped from survey frames records.
--
--   gsd_mm          ground size of a pixel along the line (mean over its vertices), millimetres;
--                   the scene's pixel size for orthophoto scenes
--   range_m         frame surveys: mean distance of the line from the camera
--   pos_accuracy_m  frame surveys: position accuracy of the poses, when the trajectory gives one
--   source_frames   frame surveys: the frames the crack was seen in, a JSON array of frame ids
-- Rows written before this migration hold NULL.

ALTER TABLE cracks
    ADD COLUMN gsd_mm double precision CHECK (gsd_mm > 0),
    ADD COLUMN range_m double precision CHECK (range_m >= 0),
    ADD COLUMN pos_accuracy_m double precision CHECK (pos_accuracy_m >= 0),
    ADD COLUMN source_frames text;

-- The view listed cracks' columns when it was created; list them again, new ones at the end.
CREATE OR REPLACE VIEW current_cracks AS
    SELECT c.*
    FROM cracks c
    JOIN scenes s USING (survey_id, scene_id, model_name, model_version)
    WHERE s.is_current;
