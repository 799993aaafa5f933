-- crackmap schema, version 7: which network mapped each scene.
--
--   scenes.inference  the backend and the precision of the graph that ran, e.g. 'onnxruntime int8',
--                     'onnxruntime fp32', 'tensorrt fp16', 'torch cuda fp16' (pipeline.backends.inference_of).
--                     A model version can run as more than one graph (ONNX Runtime picks its INT8
--                     graph on CPUs where it passed the accuracy gate and measures faster): the
--                     model version says which weights, this says how they ran.  NULL for scenes
--                     mapped before version 7 and for failed scenes.
-- The GeoPackage store has the same column in its layer `scenes`.

ALTER TABLE scenes ADD COLUMN inference text;
