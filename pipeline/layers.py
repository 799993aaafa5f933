"""The road-condition layers and crack columns, described once for both stores.

Each column is (name, kind) with kind ``text``, ``real`` or ``int``.  The
GeoPackage store creates tables from these; the PostGIS migration
``pipeline/migrations/0003_road_condition.sql`` declares the same columns (the
road columns of cracks live in ``crack_positions`` there, migration 0005, and the
``current_cracks`` view shows them in the same places).
"""

from __future__ import annotations

from pipeline.change import DELTA_FIELDS
from pipeline.sections import SUM_FIELDS

# crack columns: typing at mapping time, road referencing (and typing against the road) by `crackmap sections`
CRACK_CONDITION_COLUMNS = (
    ("crack_type", "text"),
    ("theta_deg", "real"),
    ("chord_m", "real"),
    ("tortuosity", "real"),
    ("span_ratio", "real"),
    ("pattern_no", "int"),
    ("road_id", "text"),
    ("chainage_from_m", "real"),
    ("chainage_to_m", "real"),
    ("offset_m", "real"),
)

SCENE_KEY = (("survey_id", "text"), ("scene_id", "text"), ("model_name", "text"), ("model_version", "text"))

LAYERS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "pattern_areas": (
        "MULTIPOLYGON",
        (
            *SCENE_KEY,
            ("pattern_no", "int"),
            ("class", "text"),
            ("area_m2", "real"),
            ("crack_density_m_per_m2", "real"),
            ("width_mean_mm", "real"),
            ("width_max_mm", "real"),
            ("severity", "text"),
            ("piece_m", "real"),
        ),
    ),
    "sections": (
        "POLYGON",
        (
            ("survey_id", "text"),
            ("sections_run_id", "text"),
            ("road_id", "text"),
            ("level", "text"),
            ("from_m", "real"),
            ("to_m", "real"),
            ("section_m", "real"),
            ("network", "text"),
            ("models", "text"),
            ("computed_at", "text"),
            ("is_current", "int"),
            *((f, "real") for f in SUM_FIELDS),
            ("coverage", "real"),
            ("crack_density_m_per_m2", "real"),
            ("cracked_area_pct", "real"),
            ("cracked_cells_pct", "real"),
            ("crack_index", "real"),
            ("condition_class", "text"),
        ),
    ),
    "section_changes": (
        "POLYGON",
        (
            ("from_survey", "text"),
            ("to_survey", "text"),
            ("road_id", "text"),
            ("level", "text"),
            ("from_m", "real"),
            ("to_m", "real"),
            *((f"{f}_delta", "real") for f in DELTA_FIELDS),
            ("class_from", "text"),
            ("class_to", "text"),
            ("class_changed", "int"),
            ("computed_at", "text"),
        ),
    ),
    "crack_changes": (
        "LINESTRING",
        (
            ("from_survey", "text"),
            ("to_survey", "text"),
            ("crack_id", "text"),
            ("survey_id", "text"),
            ("status", "text"),
            ("length_m", "real"),
            ("length_delta_m", "real"),
            ("computed_at", "text"),
        ),
    ),
}

SQLITE_TYPES = {"text": "TEXT", "real": "REAL", "int": "INTEGER", "datetime": "DATETIME"}


def columns(layer: str) -> tuple[str, ...]:
    """The column names of a layer (its geometry aside).

    >>> columns("crack_changes")[:3]
    ('from_survey', 'to_survey', 'crack_id')
    """
    return tuple(name for name, _ in LAYERS[layer][1])


def sqlite_columns(spec: tuple[tuple[str, str], ...]) -> str:
    """Column definitions for a GeoPackage table (``class`` quoted).

    >>> sqlite_columns((("class", "text"), ("area_m2", "real")))
    '"class" TEXT, "area_m2" REAL'
    """
    return ", ".join(f'"{name}" {SQLITE_TYPES[kind]}' for name, kind in spec)
