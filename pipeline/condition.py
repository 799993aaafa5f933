"""Road condition over a store: sections along a network, and change between surveys.

The edge where the store and the network file meet the pure functions of
``pipeline.crack_types``, ``pipeline.sections`` and ``pipeline.change``: read
a survey's current cracks, scene footprints and pattern areas; measure them
in a metric CRS; write the ``sections`` (or ``section_changes`` and
``crack_changes``) layer and the cracks' road columns in one transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import shapely

from pipeline import gpkg, projection
from pipeline.change import MatchParams, crack_status, match_cracks, section_deltas
from pipeline.crack_types import RoadFrame, TypeProfile, classify, line_shapes
from pipeline.errors import ConditionError, NetworkError
from pipeline.network import Network, read_network
from pipeline.records import CrackPositions
from pipeline.sections import (
    SUM_FIELDS,
    ConditionFormula,
    Located,
    add_up,
    condition,
    cut_sections,
    locate_cracks,
    rollup_keys,
    section_sums,
    split_by_sections,
    substrings,
)
from pipeline.stores import CrackStore

MIN_SECTION_M = 1.0


@dataclass(frozen=True, slots=True)
class SectionOptions:
    """How sections are cut and rated.

    ``corridor_m``: a crack belongs to a road if its midpoint is within this of the
    centreline.  ``rollup_m``: the reporting length (sections add up into it).
    """

    section_m: float = 10.0
    rollup_m: float = 100.0
    corridor_m: float = 5.0
    id_field: str = "road_id"
    direction_field: str = "direction"
    formula: ConditionFormula = field(default_factory=ConditionFormula)
    types: TypeProfile = field(default_factory=TypeProfile)

    def __post_init__(self) -> None:
        if not self.section_m >= MIN_SECTION_M:
            raise ConditionError(
                f"--section-m {self.section_m} is too small: sections must be at least "
                f"{MIN_SECTION_M} m (10 m is the usual raw length)"
            )
        ratio = self.rollup_m / self.section_m
        if self.rollup_m < self.section_m or abs(ratio - round(ratio)) > 1e-9:
            raise ConditionError(
                f"--rollup-m {self.rollup_m} must be a whole multiple of --section-m {self.section_m}"
            )
        if self.corridor_m <= 0:
            raise ConditionError(f"the corridor half-width must be positive, got {self.corridor_m}")


@dataclass(frozen=True, slots=True)
class SectionReport:
    """What a sections run wrote: its rows (all levels) and how the cracks were referenced."""

    survey_id: str
    run_id: str
    rows: list[dict]
    cracks: int
    located: int
    outside: int
    joints: int
    models: tuple[str, ...]


def check_survey(store: CrackStore, survey_id: str) -> None:
    known = store.survey_ids()
    if survey_id not in known:
        raise ConditionError(
            f"unknown survey {survey_id!r}; the store has {', '.join(known) or 'no surveys'}"
        )


def survey_cracks(store: CrackStore, survey_id: str, models: bool = False) -> dict[str, np.ndarray]:
    """The current cracks of a survey as arrays (one store query), in crack_id order; ``models``: with
    their model_name and model_version (a million cracks' worth of strings, read only where needed)."""
    names = (
        "crack_id",
        "scene_id",
        "length_m",
        "width_mean_mm",
        "width_max_mm",
        "severity",
        "crack_type",
        *(("model_name", "model_version") if models else ()),
    )
    out = store.crack_columns(survey_id, names)
    for n in ("length_m", "width_mean_mm", "width_max_mm"):
        out[n] = out[n].astype(float)
    return out


def run_sections(
    store: CrackStore, network_path: str, survey_id: str, options: SectionOptions = SectionOptions()
) -> SectionReport:
    """Sections of ``survey_id`` along the network: write the ``sections`` layer and the cracks' road columns.

    Raises:
        ConditionError: an unknown survey or unusable options.
        NetworkError: the network file is unusable or does not reach the survey.
    """
    check_survey(store, survey_id)
    scenes = store.footprints(survey_id)
    if not scenes:
        raise ConditionError(f"survey {survey_id!r} has no mapped scene with a footprint")
    footprints = np.array([s["geometry"] for s in scenes], dtype=object)
    metric = projection.metric_crs(store.crs, shapely.total_bounds(footprints))
    network = read_network(network_path, metric, options.id_field, direction_field=options.direction_field)
    imaged = projection.transform(footprints, store.crs, metric)
    scene_tree = shapely.STRtree(imaged)
    if not len(scene_tree.query(network.geometry, predicate="dwithin", distance=options.corridor_m)[0]):
        raise NetworkError(
            f"{network_path}: no road comes within {options.corridor_m} m of survey "
            f"{survey_id!r}'s scenes; is it the right network (and CRS)?; nothing was written"
        )
    cracks = survey_cracks(store, survey_id)
    lines = projection.transform(cracks["geometry"], store.crs, metric)
    located = locate_cracks(lines, network.geometry, options.corridor_m)
    sections = cut_sections(network.geometry, network.width_m, options.section_m)
    coverage = imaged_area_m2(sections.polygon, imaged, scene_tree)
    typed = retype(
        lines,
        cracks,
        located,
        network,
        imaged,
        [s["scene_id"] for s in scenes],
        sections,
        coverage,
        options.section_m,
        options.types,
        scene_tree,
    )
    counted = typed.crack_type != "joint"
    counted_located = only(located, counted)
    pieces = split_by_sections(counted_located, sections, options.section_m)
    sums = section_sums(
        pieces,
        np.where(counted, cracks["length_m"], 0.0),
        typed.crack_type,
        cracks["severity"],
        counted_located,
        sections,
        coverage,
        pattern_pairs(store, survey_id, sections, metric),
        options.formula,
        options.section_m,
    )
    run_id = str(uuid.uuid4())
    models = tuple(sorted({f"{s['model_name']}:{s['model_version']}" for s in scenes}))
    rows = section_rows(sums, sections, network, options, metric, store.crs)
    stamp = {
        "survey_id": survey_id,
        "sections_run_id": run_id,
        "section_m": options.section_m,
        "network": network.source,
        "models": ", ".join(models),
        "computed_at": gpkg.now(),
        "is_current": 1,
    }
    rows = [dict(r, **stamp) for r in rows]
    store.replace_layer(
        "sections",
        rows,
        {"survey_id": survey_id},
        keep_previous=True,
        positions=crack_positions(survey_id, cracks, located, network, typed),
    )
    inside = int((located.road >= 0).sum())
    return SectionReport(
        survey_id, run_id, rows, len(lines), inside, len(lines) - inside, int((~counted).sum()), models
    )


def imaged_area_m2(
    polygons: np.ndarray, imaged: np.ndarray, tree: shapely.STRtree | None = None
) -> np.ndarray:
    """Per polygon: the area of it that at least one scene footprint covers.

    Pairwise intersections with the footprints a spatial index finds; where
    several footprints overlap one polygon, the union of its pieces (one
    ``union_all`` over a padded array, not a loop).  Never against the union of all
    footprints: one overlay per section with a whole survey's outline was slow.

    >>> square = shapely.box(0, 0, 10, 10)
    >>> imaged_area_m2(np.array([square, shapely.box(20, 0, 30, 10)]),
    ...                np.array([shapely.box(-5, 0, 4, 10), shapely.box(2, 0, 6, 10)])).tolist()
    [60.0, 0.0]
    """
    tree = tree or shapely.STRtree(imaged)
    polygon, scene = tree.query(polygons, predicate="intersects")
    order = np.argsort(polygon, kind="stable")
    polygon, scene = polygon[order], scene[order]
    pieces = shapely.intersection(polygons[polygon], imaged[scene])
    count = np.bincount(polygon, minlength=len(polygons))
    area = np.zeros(len(polygons))
    single = count[polygon] == 1
    area[polygon[single]] = shapely.area(pieces[single])
    several = np.flatnonzero(count > 1)
    if len(several):
        rank = np.searchsorted(several, polygon[~single])
        column = np.arange(len(rank)) - np.searchsorted(rank, rank)
        grid = np.full((len(several), count.max()), None, dtype=object)
        grid[rank, column] = pieces[~single]
        area[several] = shapely.area(shapely.union_all(grid, axis=1))
    return area


def only(located: Located, keep: np.ndarray) -> Located:
    """``located`` with the segments of the cracks not kept taken out (per-crack arrays stay)."""
    seg = keep[located.segment_crack]
    return Located(
        np.where(keep, located.road, -1),
        located.chainage_from_m,
        located.chainage_to_m,
        located.offset_m,
        located.road_deg,
        located.segment_crack[seg],
        located.segment_chainage[seg],
        located.segment_offset[seg],
        located.segment_length_m[seg],
    )


def retype(
    lines: np.ndarray,
    cracks: dict,
    located: Located,
    network: Network,
    imaged: np.ndarray,
    scene_ids: list[str],
    sections,
    coverage_m2: np.ndarray,
    section_m: float,
    profile: TypeProfile,
    scene_tree: shapely.STRtree | None = None,
):
    """Type the cracks again against the road direction of the network.

    Pattern members stay ``pattern`` and joints stay ``joint`` (both decided per scene
    when it was mapped).  The frame is the road's: the imaged width (for
    ``span_ratio``) is the road width times its section's coverage.  Cracks outside
    every corridor keep their type from mapping time (against their scene's long axis).
    """
    inside = located.road >= 0
    n, n_roads = len(lines), len(network.road_id)
    scene_no = {s: i for i, s in enumerate(scene_ids)}
    scene = np.array([scene_no.get(s, -1) for s in cracks["scene_id"]], dtype=int)
    road = np.maximum(located.road, 0)
    # length of each road inside each scene that it crosses: its sections' pieces (short lines) added up
    section_idx, scene_idx = (scene_tree or shapely.STRtree(imaged)).query(
        sections.centreline, predicate="intersects"
    )
    piece_key = scene_idx * n_roads + sections.road[section_idx]
    pair_key, at_pair = np.unique(piece_key, return_inverse=True)
    pair_length = np.bincount(
        at_pair.ravel(),
        shapely.length(shapely.intersection(sections.centreline[section_idx], imaged[scene_idx])),
        len(pair_key),
    )
    crack_key = scene * n_roads + road
    imaged_length = np.full(n, np.nan)
    if len(pair_key):
        at = np.clip(np.searchsorted(pair_key, crack_key), 0, len(pair_key) - 1)
        hit = pair_key[at] == crack_key
        imaged_length[hit] = pair_length[at][hit]
    mid = np.nan_to_num((located.chainage_from_m + located.chainage_to_m) / 2)
    section = sections.first[road] + np.minimum((mid // section_m).astype(int), sections.count[road] - 1)
    cover = np.minimum(coverage_m2 / shapely.area(sections.polygon), 1.0)
    imaged_width = network.width_m[road] * cover[section]
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(lo, located.segment_crack, located.segment_offset.min(axis=1))
    np.maximum.at(hi, located.segment_crack, located.segment_offset.max(axis=1))
    frame = RoadFrame(
        mid,
        located.offset_m,
        located.chainage_to_m - located.chainage_from_m,
        hi - lo,
        imaged_length,
        imaged_width,
        np.where(inside, scene * (n_roads + 1) + located.road, -1),
    )
    pattern = cracks["crack_type"] == "pattern"
    typed = classify(
        lines,
        np.where(inside, located.road_deg, 0.0),
        frame,
        cracks["width_mean_mm"],
        cracks["width_max_mm"],
        pattern,
        profile,
        joint=cracks["crack_type"] == "joint",
    )
    keep_old = ~inside & (cracks["crack_type"] != None)  # noqa: E711  (object array)
    typed.crack_type[keep_old] = cracks["crack_type"][keep_old]
    return typed


def crack_positions(
    survey_id: str, cracks: dict, located: Located, network: Network, typed
) -> CrackPositions:
    """The located cracks' road columns and typing against the road, for ``replace_layer``."""
    inside = np.flatnonzero(located.road >= 0)
    return CrackPositions(
        survey_id,
        cracks["crack_id"][inside],
        network.road_id[located.road[inside]],
        located.chainage_from_m[inside],
        located.chainage_to_m[inside],
        located.offset_m[inside],
        typed.crack_type[inside],
        typed.theta_deg[inside],
        typed.span_ratio[inside],
    )


def pattern_pairs(
    store: CrackStore, survey_id: str, sections, metric
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(section, class, severity, area m2) for every piece of a current pattern area inside a section."""
    rows = store.read_layer("current_pattern_areas", {"survey_id": survey_id})
    if not rows:
        return np.zeros(0, int), np.zeros(0, object), np.zeros(0, object), np.zeros(0)
    areas = projection.transform([r["geometry"] for r in rows], store.crs, metric)
    area_idx, section_idx = shapely.STRtree(sections.polygon).query(areas, predicate="intersects")
    piece = shapely.area(shapely.intersection(areas[area_idx], sections.polygon[section_idx]))
    kinds = np.array([r["class"] for r in rows], dtype=object)
    severity = np.array([r["severity"] for r in rows], dtype=object)
    return section_idx, kinds[area_idx], severity[area_idx], piece


def section_rows(
    sums: dict, sections, network: Network, options: SectionOptions, metric, store_crs
) -> list[dict]:
    """Rows of the sections layer: the sections, their rollups to ``rollup_m`` and whole roads."""
    rows = []
    for level, rollup in (("section", None), ("rollup", options.rollup_m), ("road", None)):
        if level == "section":
            key = np.arange(len(sections.road))
        else:
            key = rollup_keys(sections.road, sections.from_m, rollup)
        group = add_up(sums, key)
        road = np.zeros(len(group["section_area_m2"]), int)
        road[key] = sections.road
        start = np.full(len(road), np.inf)
        np.minimum.at(start, key, sections.from_m)
        stop = np.zeros(len(road))
        np.maximum.at(stop, key, sections.to_m)
        if level == "section":
            polygons = sections.polygon
        else:
            polygons = shapely.buffer(
                substrings(network.geometry, road, start, stop), network.width_m[road] / 2, cap_style="flat"
            )
        figures = condition(group, options.formula)
        geometry = projection.transform(polygons, metric, store_crs)
        for i in range(len(road)):  # one row per section or rollup, never per crack
            rows.append(
                {
                    "road_id": network.road_id[road[i]],
                    "level": level,
                    "from_m": float(start[i]),
                    "to_m": float(stop[i]),
                    "geometry": geometry[i],
                    **{f: float(group[f][i]) for f in SUM_FIELDS},
                    **{f: _value(v[i]) for f, v in figures.items()},
                }
            )
    return rows


def _value(v):
    if v is None or isinstance(v, str):
        return v
    return None if np.isnan(v) else float(v)


@dataclass(frozen=True, slots=True)
class ChangeReport:
    """What a change run wrote and found."""

    from_survey: str
    to_survey: str
    sections: list[dict]  # section_changes rows
    counts: dict[str, int]  # per status
    warning: str | None  # different model versions


def run_change(
    store: CrackStore,
    from_survey: str,
    to_survey: str,
    network_path: str | None = None,
    options: SectionOptions = SectionOptions(),
    match: MatchParams = MatchParams(),
) -> ChangeReport:
    """Compare two surveys: crack statuses into ``crack_changes``, section deltas into ``section_changes``.

    With ``network_path`` both surveys' sections are computed first; without it, their
    current sections must exist (``crackmap sections``).

    Raises:
        ConditionError: the same survey twice, an unknown survey, or no sections to compare.
    """
    if from_survey == to_survey:
        raise ConditionError(
            f"--from and --to are both {from_survey!r}; compare two different surveys "
            f"(the store has {', '.join(store.survey_ids())})"
        )
    for survey in (from_survey, to_survey):
        check_survey(store, survey)
    if network_path is not None:
        for survey in (from_survey, to_survey):
            run_sections(store, network_path, survey, options)
    before = store.read_layer("current_sections", {"survey_id": from_survey})
    after = store.read_layer("current_sections", {"survey_id": to_survey})
    if not before or not after:
        missing = from_survey if not before else to_survey
        raise ConditionError(
            f"survey {missing!r} has no sections yet; run crackmap sections STORE --network "
            "ROADS --survey ID first, or pass --network"
        )
    a, b = survey_cracks(store, from_survey, models=True), survey_cracks(store, to_survey, models=True)
    a = {k: v[a["crack_type"] != "joint"] for k, v in a.items()}
    b = {k: v[b["crack_type"] != "joint"] for k, v in b.items()}
    footprints = [s["geometry"] for s in store.footprints(to_survey)]
    metric = projection.metric_crs(store.crs, shapely.total_bounds(footprints))
    a_lines = projection.transform(a["geometry"], store.crs, metric)
    b_lines = projection.transform(b["geometry"], store.crs, metric)
    pairs = match_cracks(
        a_lines, line_shapes(a_lines).axis_deg, b_lines, line_shapes(b_lines).axis_deg, match
    )
    status, gone, grew = crack_status(
        pairs, a["length_m"], a["width_mean_mm"], b["length_m"], b["width_mean_mm"], match
    )
    stamp = {"from_survey": from_survey, "to_survey": to_survey, "computed_at": gpkg.now()}
    crack_rows = [
        dict(
            stamp,
            crack_id=str(i),
            survey_id=to_survey,
            status=s,
            length_m=float(length),
            length_delta_m=float(g),
            geometry=geom,
        )
        for i, s, length, g, geom in zip(b["crack_id"], status, b["length_m"], grew, b["geometry"])
    ]
    crack_rows += [
        dict(
            stamp,
            crack_id=str(i),
            survey_id=from_survey,
            status="gone",
            length_m=float(length),
            length_delta_m=-float(length),
            geometry=geom,
        )
        for i, length, geom in zip(a["crack_id"][gone], a["length_m"][gone], a["geometry"][gone])
    ]
    deltas = [dict(r, **stamp) for r in section_deltas(before, after)]
    pair = {"from_survey": from_survey, "to_survey": to_survey}
    store.replace_layer("crack_changes", crack_rows, pair, also=[("section_changes", deltas, pair)])
    counts = {s: int((status == s).sum()) for s in ("new", "grown", "unchanged")} | {"gone": int(gone.sum())}
    models_a, models_b = (
        sorted({f"{n}:{v}" for n, v in zip(c["model_name"], c["model_version"])}) for c in (a, b)
    )
    warning = None
    if models_a != models_b:
        warning = (
            f"the surveys were mapped with different models ({', '.join(models_a) or 'none'} vs "
            f"{', '.join(models_b) or 'none'}): part of the change may be the model, not the road "
            "(a better model is not a worse road); reprocess both with one model version to compare"
        )
    return ChangeReport(from_survey, to_survey, deltas, counts, warning)
