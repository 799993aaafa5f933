"""Survey and scene ids: checked before they become folder names, file names or object keys.

A survey id is one path component; a scene id is one or more, joined by ``/``
(a scene in a sub-folder of the survey keeps that folder).  Each component:

- is 1 to ``MAX_COMPONENT_BYTES`` bytes (UTF-8), and a scene id at most ``MAX_ID_BYTES``;
- holds letters, digits, spaces and punctuation, but none of ``\\ / : * ? " < > |``
  (``/`` only between a scene id's components) and no control character;
- is not ``.`` or ``..``, and neither starts nor ends with a space.

These names are safe on local disks (Linux, macOS and Windows) and as object keys.
"""

from __future__ import annotations

import re

from pipeline.errors import IdError

MAX_COMPONENT_BYTES = 100  # a file name adds ".<model>-<version>.tif" and must stay under 255 bytes
MAX_ID_BYTES = 200
FORBIDDEN = '\\/:*?"<>|'
RULE = (
    f"ids are 1-{MAX_COMPONENT_BYTES} bytes of letters, digits, spaces and punctuation except "
    f"{' '.join(FORBIDDEN)} (scene ids may have sub-folders separated by /, {MAX_ID_BYTES} bytes "
    "in all), not '.' or '..', without leading or trailing spaces"
)
_BAD_CHARACTER = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]')


def _component_problem(part: str) -> str | None:
    if not part:
        return "an empty name"
    if part in (".", ".."):
        return f"{part!r} as a name"
    if len(part.encode()) > MAX_COMPONENT_BYTES:
        return f"a name of {len(part.encode())} bytes"
    if part != part.strip(" "):
        return "a leading or trailing space"
    if bad := _BAD_CHARACTER.search(part):
        return f"the character {bad.group()!r}"
    return None


def check_survey_id(survey_id: str) -> str:
    """``survey_id`` if it is a valid survey id, else IdError naming the rule.

    >>> check_survey_id("road-12 2026")
    'road-12 2026'
    >>> check_survey_id("../elsewhere")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.errors.IdError: survey id '../elsewhere' has the character '/'; ids are 1-100 bytes ...
    """
    problem = _component_problem(str(survey_id))
    if problem:
        raise IdError(f"survey id {_shown(survey_id)} has {problem}; {RULE}")
    return survey_id


def check_scene_id(scene_id: str, source: str | None = None) -> str:
    """``scene_id`` if it is a valid scene id (sub-folders allowed), else IdError naming the rule.

    >>> check_scene_id("2026/lane-1/0007")
    '2026/lane-1/0007'
    >>> check_scene_id("a/../../b")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.errors.IdError: scene id 'a/../../b' has '..' as a name; ids are 1-100 bytes ...
    """
    problem = (
        f"{len(scene_id.encode())} bytes"
        if len(str(scene_id).encode()) > MAX_ID_BYTES
        else next(filter(None, map(_component_problem, str(scene_id).split("/"))), None)
    )
    if problem:
        where = f" (from {source})" if source else ""
        raise IdError(f"scene id {_shown(scene_id)}{where} has {problem}; {RULE}")
    return scene_id


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"...' ({len(value)} characters)"
