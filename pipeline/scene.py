"""Processing one scene: chips -> network -> stitched probability -> measured crack lines.

Reading, inference and stitching/vectorizing run in three threads joined by
small bounded queues, so the network never waits for the disk and memory
stays a few strips of the scene.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.crs import CRS

from models.registry import ModelEntry
from pipeline import buckets, projection
from pipeline.backends import Backend, inference_of, predictions
from pipeline.crack_types import TypeProfile, classify, joint_lines, scene_frame, type_profile
from pipeline.errors import OptionsError, SceneContentError
from pipeline.measure import Georeferencer, Severity
from pipeline.pattern_areas import PatternParams, find_pattern_areas
from pipeline.probability import ProbabilityWriter
from pipeline.raster import SceneReader
from pipeline.records import ChipBatch, CrackLine, PatternAreaRecord, SceneResult
from pipeline.stitching import StripStitcher
from pipeline.tiling import check_grid, chip_windows
from pipeline.vectorize import BandVectorizer, VectorizeParams

# progress(scene_id, chips_done, chips_total)
Progress = Callable[[str, int, int], None]
QUEUE_BATCHES = 3


@dataclass(frozen=True, slots=True)
class SceneOptions:
    """How scenes are cut, blended and vectorized.  ``threshold=None`` uses the model's."""

    size_px: int = 400
    overlap_px: int = 64
    border_px: int = 16
    threshold: float | None = None
    vectorize: VectorizeParams = field(default_factory=VectorizeParams)
    severity: Severity = field(default_factory=Severity)
    types: TypeProfile = field(default_factory=TypeProfile)
    pattern: PatternParams = field(default_factory=PatternParams)

    def __post_init__(self) -> None:
        check_grid(self.size_px, self.overlap_px, self.border_px)

    def vectorize_params(self, model: ModelEntry) -> VectorizeParams:
        """The vectorizer's settings for ``model``.

        The seed threshold: one asked for, else the line threshold chosen for the model version
        on val scenes (``ModelEntry.line_settings``), else its pixel threshold.  The hysteresis:
        where settings were chosen, lines grow down to the chosen low level, whatever the seed
        threshold (never above it): a network's background can sit at a fixed probability (the
        bias of its last layer; 0.28 for hrsegnet-b16 1.1.0), and a low level below it would
        join the whole background into one crack.  Else the vectorizer's ratio (0.5).
        """
        chosen = model.line_settings if model is not None else {}  # frame tests call with no model
        threshold = self.threshold or chosen.get("threshold") or model.threshold
        low_ratio = self.vectorize.low_ratio
        if chosen:
            low_ratio = min(1.0, chosen["threshold"] * chosen["low_ratio"] / threshold)
        return replace(self.vectorize, threshold=threshold, low_ratio=low_ratio)

    def check_threshold(self, model: ModelEntry) -> None:
        """Refuse a threshold whose lines would grow down to the probability ``model`` gives plain
        road (its card's ``background``): every pixel would join one crack, slowly.

        Raises:
            OptionsError: Naming the threshold, the background level and what would work.
        """
        floor = model.background_probability
        if self.threshold is None or floor is None:
            return
        params = self.vectorize_params(model)
        low = params.threshold * params.low_ratio
        if low <= floor:
            raise OptionsError(
                f"threshold {self.threshold:g} is too low for {model.spec}: its lines would grow down to "
                f"crack probability {low:.3f}, at or below the {floor:.3f} it gives plain road, and the "
                f"whole background would become cracks; use a threshold above {floor / params.low_ratio:.3f}"
            )

    @classmethod
    def from_mapping(cls, mapping: dict | None, type_profile_name: str | None = None) -> SceneOptions:
        """Options from the user-settable ``MAPPING_OPTIONS`` (CLI, flow and deployment parameters).

        The crack-type profile is the mapping's ``type_profile``, else ``type_profile_name``
        (CRACKMAP_TYPE_PROFILE where flows call this), else the default (aashto-r85).

        >>> options = SceneOptions.from_mapping({"threshold": 0.4, "min_length_m": 0.05})
        >>> options.threshold, options.vectorize.min_length_m, options.overlap_px
        (0.4, 0.05, 64)
        >>> SceneOptions.from_mapping({"type_profile": "strict-10"}, "loose-30").types.name
        'strict-10'

        Raises:
            OptionsError: Naming an unknown key or a value out of range.
        """
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(MAPPING_OPTIONS) - {PROFILE_OPTION})
        if unknown:
            raise OptionsError(
                f"unknown mapping option(s) {', '.join(unknown)}; "
                f"choose from {', '.join([*MAPPING_OPTIONS, PROFILE_OPTION])}"
            )
        profile_name = mapping.pop(PROFILE_OPTION, None) or type_profile_name
        try:
            types = type_profile(profile_name) if profile_name else cls().types
        except (ValueError, TypeError) as exc:
            raise OptionsError(str(exc)) from None
        for key, value in mapping.items():
            low, high, text = MAPPING_OPTIONS[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise OptionsError(f"{key} must be a number {text}, not {value!r}")
        defaults = cls()
        severity = Severity(
            mapping.get("severity_medium_mm", defaults.severity.medium_mm),
            mapping.get("severity_high_mm", defaults.severity.high_mm),
        )
        if severity.medium_mm >= severity.high_mm:
            raise OptionsError(
                f"severity_medium_mm ({severity.medium_mm}) must be below "
                f"severity_high_mm ({severity.high_mm})"
            )
        changes: dict[str, Any] = {k: float(mapping[k]) for k in VECTORIZE_OPTIONS if k in mapping}
        vectorize = replace(defaults.vectorize, **changes)
        overlap = int(mapping.get("overlap_px", defaults.overlap_px))
        try:
            return cls(
                overlap_px=overlap,
                threshold=mapping.get("threshold"),
                vectorize=vectorize,
                severity=severity,
                types=types,
            )
        except ValueError as exc:
            raise OptionsError(f"overlap_px {overlap}: {exc}") from exc


# Options a user may set for a run (crackmap run / reprocess --option, flow and deployment
# parameters): name -> (lowest, highest, how to say the range).  Besides these numbers,
# PROFILE_OPTION names the crack-type profile (pipeline.crack_types.PROFILES; --profile).
PROFILE_OPTION = "type_profile"
MAPPING_OPTIONS = {
    "threshold": (1e-6, 1.0 - 1e-6, "between 0 and 1 (crack probability)"),
    "overlap_px": (32, 200, "of pixels from 32 to 200"),
    "severity_medium_mm": (0.1, 1000.0, "of millimetres above 0"),
    "severity_high_mm": (0.1, 1000.0, "of millimetres above 0"),
    "min_length_m": (0.0, 10.0, "of metres from 0 to 10"),
    "bridge_gap_px": (0.0, 200.0, "of pixels from 0 to 200"),
}
VECTORIZE_OPTIONS = ("min_length_m", "bridge_gap_px")


class _Worker(threading.Thread):
    """A thread that keeps its exception for the thread that joins it."""

    def __init__(self, target: Callable[[], None], name: str, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self._work, self._halt = target, stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # re-raised by run_network
            self.error = exc
            self._halt.set()


def run_network(
    uri: str,
    scene_id: str,
    backend: Backend,
    stitcher: StripStitcher,
    options: SceneOptions,
    progress: Progress | None = None,
    georeferenced: bool = True,
    road: np.ndarray | None = None,
) -> int:
    """Stream a scene's chips through ``backend`` into ``stitcher``; returns the chips run.

    Three threads: reading (``crackmap-read``), the network (the caller's),
    stitching with everything downstream of it (``crackmap-stitch``).  The
    first error in any of them stops all three and is raised here.
    """
    batches: queue.Queue = queue.Queue(QUEUE_BATCHES)
    results: queue.Queue = queue.Queue(QUEUE_BATCHES)
    stop = threading.Event()

    def read() -> None:
        try:
            with SceneReader(uri, scene_id, georeferenced=georeferenced, road=road) as reader:
                for batch in reader.chip_batches(options.size_px, options.overlap_px, backend.batch_size):
                    if stop.is_set():
                        return
                    batches.put(batch)
        finally:
            batches.put(None)

    def stitch() -> None:
        failed = None
        while (item := results.get()) is not None:  # taken to the end: the network never blocks
            if failed is None and not stop.is_set():
                batch, probability = item
                try:
                    for window, p, valid in zip(batch.windows, probability, batch.valid):
                        stitcher.add(window, p, valid)
                except BaseException as exc:
                    failed = exc
                    stop.set()
        if failed is not None:
            raise failed
        if not stop.is_set():
            stitcher.finish()

    workers = [_Worker(read, "crackmap-read", stop), _Worker(stitch, "crackmap-stitch", stop)]
    for worker in workers:
        worker.start()
    total = len(chip_windows(stitcher.width, stitcher.height, options.size_px, options.overlap_px))
    chips = 0
    reader_done = threading.Event()  # its closing None was taken off the queue

    def read_batches() -> Iterator[ChipBatch]:
        while (batch := batches.get()) is not None:
            if stop.is_set():
                break
            yield batch
        else:
            reader_done.set()

    def drain() -> None:  # so that a reader blocked on the full queue can end
        if not reader_done.is_set():
            while batches.get() is not None:
                pass

    try:
        for batch, probability in predictions(backend, read_batches(), lambda b: b.pixels):
            results.put((batch, probability))
            chips += len(batch.windows)
            if progress:
                progress(scene_id, chips, total)
        if stop.is_set():
            drain()
    except BaseException:
        stop.set()
        drain()
        raise
    finally:
        results.put(None)
        for worker in workers:
            worker.join()
    for worker in workers:
        if worker.error is not None:
            raise worker.error
    if progress:
        progress(scene_id, total, total)
    return chips


def detect_cracks(
    uri: str,
    backend: Backend,
    model: ModelEntry,
    probability_path: str | Path,
    store_crs: CRS,
    options: SceneOptions = SceneOptions(),
    scene_id: str | None = None,
    progress: Progress | None = None,
    source_sha256: str | None = None,
) -> SceneResult:
    """Map the cracks of one scene.

    Writes the scene's crack probability COG to ``probability_path`` (a local
    path or a storage URL) and returns its measured crack lines in ``store_crs``.
    ``source_sha256`` is the source identity if the caller already has it
    (an ETag from a listing); otherwise it is computed (``buckets.identity``).

    Raises:
        SceneReadError: the file is missing, not a raster, or truncated.
        SceneContentError: no CRS, nothing but nodata, or a CRS that cannot be
            transformed to ``store_crs``.
    """
    started = time.perf_counter()
    with SceneReader(uri, scene_id) as reader:
        scene = reader.scene
    params = options.vectorize_params(model)
    geo = Georeferencer.for_scene(scene, store_crs, params, options.severity)  # fails fast on CRS
    vectorizer = BandVectorizer(scene.width, scene.height, replace(params, column_spacing=geo.column_spacing))

    def sink(row_off, p, valid):
        probability(row_off, p, valid)
        vectorizer(row_off, p, valid)

    stitcher = StripStitcher(
        scene.width, scene.height, sink, options.size_px, options.border_px, options.overlap_px
    )
    probability = ProbabilityWriter(probability_path, scene)  # last: it stages files, abort() removes them
    try:
        chips = run_network(uri, scene.scene_id, backend, stitcher, options, progress)
        if chips == 0:
            raise SceneContentError(uri, "is all nodata")
        pieces = vectorizer.finish()
        probability.finish()
    except BaseException:
        probability.abort()
        raise
    cracks = geo.crack_lines(pieces)
    footprint = geo.footprint(scene.width, scene.height)
    cracks, areas = type_cracks(cracks, footprint, store_crs, options)
    return SceneResult(
        scene=scene,
        cracks=cracks,
        footprint=footprint,
        chip_count=chips,
        probability_path=str(probability_path),
        seconds=time.perf_counter() - started,
        sha256=source_sha256 or buckets.identity(uri),
        stats={"pixel_size_m": geo.pixel_size_m},
        pattern_areas=areas,
        inference=inference_of(backend),
    )


def type_cracks(
    cracks: tuple[CrackLine, ...],
    footprint,
    store_crs: CRS,
    options: SceneOptions = SceneOptions(),
    road_axis=None,
) -> tuple[tuple[CrackLine, ...], tuple[PatternAreaRecord, ...]]:
    """Type a scene's cracks against the road direction: ``road_axis`` or else the scene's long axis.

    Joints first (pipeline.crack_types), then pattern areas among the other cracks
    (pipeline.pattern_areas), then longitudinal / transverse / diagonal.  Measured in
    a metric CRS (the store's if metric, else the scene's UTM zone).  ``road_axis``: a
    LineString along the road in the store CRS (a survey frame's: the vehicle's
    direction); without it, the footprint's long axis (scenes are strips along the road).
    """
    if not cracks:
        return cracks, ()
    metric = projection.metric_crs(store_crs, footprint.bounds)
    lines = projection.transform([c.geometry for c in cracks], store_crs, metric)
    outline = projection.transform([footprint], store_crs, metric)[0]
    road_deg = None
    if road_axis is not None:
        (x0, y0), (x1, y1) = shapely.get_coordinates(projection.transform([road_axis], store_crs, metric)[0])[
            [0, -1]
        ]
        road_deg = float(np.degrees(np.arctan2(y1 - y0, x1 - x0)) % 180.0)
    road_deg, frame = scene_frame(lines, outline, road_deg)
    width_mean = np.array([c.width_mean_mm for c in cracks])
    width_max = np.array([c.width_max_mm for c in cracks])
    joint = joint_lines(lines, road_deg, outline, width_mean, width_max, options.types)
    candidates = np.flatnonzero(~joint)
    found = find_pattern_areas(lines[candidates], options.pattern)
    pattern_no = np.full(len(cracks), -1)
    for no, area in enumerate(found):
        pattern_no[candidates[area.members]] = no
    typed = classify(lines, road_deg, frame, width_mean, width_max, pattern_no >= 0, options.types, joint)
    areas = tuple(
        pattern_record(
            area,
            width_mean[candidates[area.members]],
            width_max[candidates[area.members]],
            options.severity,
            metric,
            store_crs,
        )
        for area in found
    )
    out = tuple(
        replace(
            c,
            crack_type=str(typed.crack_type[i]),
            theta_deg=float(typed.theta_deg[i]),
            chord_m=float(typed.chord_m[i]),
            tortuosity=float(typed.tortuosity[i]),
            span_ratio=None if np.isnan(typed.span_ratio[i]) else float(typed.span_ratio[i]),
            pattern_no=int(pattern_no[i]) if pattern_no[i] >= 0 else None,
        )
        for i, c in enumerate(cracks)
    )
    return out, areas


def pattern_record(
    area, width_mean_mm: np.ndarray, width_max_mm: np.ndarray, severity: Severity, metric, store_crs: CRS
) -> PatternAreaRecord:
    """A found area as a record in the store CRS; severity from its members' mean width."""
    mean = float(width_mean_mm.mean())
    return PatternAreaRecord(
        projection.transform([area.geometry], metric, store_crs)[0],
        area.pattern_class,
        area.area_m2,
        area.crack_density_m_per_m2,
        mean,
        float(width_max_mm.max()),
        severity.classify(mean),
        area.piece_m,
    )
