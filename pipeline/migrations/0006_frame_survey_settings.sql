-- crackmap schema, version 6: what reprocessing needs to map a frame survey again.
--
--   surveys.frame_survey  a frame survey's settings, as it was last mapped (JSON): the camera file,
--                         the trajectory (or null: EXIF GPS), where frame times come from, the
--                         trajectory limits and the join tolerance (pipeline.frames.FrameSurvey);
--                         NULL for a survey of orthophoto scenes.
--   surveys.updated_at    when they were last set.
-- The GeoPackage store keeps the same columns in its attributes table `surveys`.

ALTER TABLE surveys
    ADD COLUMN frame_survey jsonb,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
