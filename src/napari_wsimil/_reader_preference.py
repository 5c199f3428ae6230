"""Making wsimil the reader napari uses for slide files, and checks of an opened slide (no Qt).

napari lets a plugin claim file name patterns (``filename_patterns`` of the reader in ``napari.yaml``) but gives
no plugin priority: when several readers match a path (napari's builtin reader takes ``*.tif`` and ``*.svs``
too), File > Open and drag-and-drop show the "Choose reader" dialog unless the user's settings name a reader for
that pattern (``napari.settings.get_settings().plugins.extension2reader``, edited in Preferences > Plugins, or by
the dialog's "remember" box). :func:`set_reader_preference` writes those entries for every slide pattern;
:func:`offer_reader_preference` asks once (a napari notification with buttons; the answer is remembered in
``napari-wsimil.json`` beside napari's settings file).

:func:`foreign_slide_path` recognises a slide that another reader opened (a plain, non-lazy image in pixels, which
the docks ignore); :func:`mpp_problem` says when a slide's µm per pixel cannot be right (e.g. a 72-dpi TIFF
resolution tag read as 352.78 µm/px).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_wsimil._grid import META_KEY
from wsimil_core.api import MPP_RANGE, ImplausibleMppWarning, implausible_mpp

#: file name endings the slide reader accepts (lower case)
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".dcm",
    ".ome.tif",
    ".ome.tiff",
    ".qptiff",
)
PLUGIN = "napari-wsimil"
#: the file beside napari's settings that remembers the user's answer to the offer.
ANSWER_FILE = "napari-wsimil.json"
#: set (non-empty) to never show the offer (scripts, screenshots, CI)
NO_OFFER_ENV = "WSIMIL_NO_READER_OFFER"


def is_slide_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file with a slide extension."""
    name = str(path).lower()
    return name.endswith(SLIDE_SUFFIXES) and Path(path).is_file()


_session: dict[str, Any] = {"offered": False, "answer": None}


def slide_patterns() -> list[str]:
    """The reader's file name patterns: ``*<suffix>`` for every slide suffix, lower and upper case."""
    lower = [f"*{s}" for s in SLIDE_SUFFIXES]
    return lower + [p.upper() for p in lower]


def _settings(settings: Any = None) -> Any:
    if settings is not None:
        return settings
    from napari.settings import get_settings

    return get_settings()


def missing_preferences(settings: Any = None) -> list[str]:
    """Slide patterns for which napari's settings do not name wsimil as the reader."""
    prefs = _settings(settings).plugins.extension2reader
    return [p for p in slide_patterns() if prefs.get(p) != PLUGIN]


def set_reader_preference(settings: Any = None) -> list[str]:
    """Make wsimil napari's reader for every slide pattern (other patterns are kept); returns the patterns set.

    napari saves its settings when they change (unless they have no file, as in tests)."""
    s = _settings(settings)
    missing = missing_preferences(s)
    if missing:
        s.plugins.extension2reader = {**s.plugins.extension2reader, **dict.fromkeys(missing, PLUGIN)}
    return missing


def _answer_path(settings: Any = None) -> Path | None:
    path = getattr(_settings(settings), "config_path", None)
    return Path(path).parent / ANSWER_FILE if path else None


def remembered_answer(settings: Any = None) -> str | None:
    """``"yes"`` / ``"no"`` when the user answered the offer (this session, or saved beside napari's settings)."""
    if _session["answer"]:
        return _session["answer"]
    path = _answer_path(settings)
    if path is None or not path.is_file():
        return None
    try:
        answer = json.loads(path.read_text(encoding="utf-8")).get("reader_preference")
    except (OSError, ValueError, AttributeError):
        return None
    return answer if answer in ("yes", "no") else None


def remember_answer(answer: str, settings: Any = None) -> None:
    """Remember the user's answer (``"yes"`` / ``"no"``) so the offer is not shown again."""
    _session["answer"] = answer
    path = _answer_path(settings)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"reader_preference": answer}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only config folder: remembered for this session only
        pass


def accept_offer(settings: Any = None) -> list[str]:
    """The offer's "yes": set the preference and remember the answer; returns the patterns set."""
    patterns = set_reader_preference(settings)
    remember_answer("yes", settings)
    return patterns


def decline_offer(settings: Any = None) -> None:
    """The offer's "no": remember it (wsimil stays selectable in napari's reader dialog)."""
    remember_answer("no", settings)


def should_offer(settings: Any = None) -> bool:
    """Whether to offer the preference: some slide pattern lacks it, it was never answered, not offered yet, and
    ``$WSIMIL_NO_READER_OFFER`` is not set (scripts, screenshots)."""
    if os.environ.get(NO_OFFER_ENV):
        return False
    return not _session["offered"] and remembered_answer(settings) is None and bool(missing_preferences(settings))


def offer_reader_preference(settings: Any = None, dispatch: Callable[[Any], None] | None = None) -> bool:
    """Offer once (per session, until answered) to make wsimil the slide reader: a non-blocking napari
    notification with the buttons "Open slides with wsimil" and "No". Returns whether it was shown.

    ``dispatch`` receives the ``Notification`` (default: napari's notification manager)."""
    if not should_offer(settings):
        return False
    from napari.utils.notifications import Notification, NotificationSeverity, notification_manager

    _session["offered"] = True
    message = (
        "wsimil reads slide files lazily, in µm. Open .svs/.tif/.ndpi/.mrxs/.dcm... with wsimil without napari's "
        "'Choose reader' dialog? (Preferences > Plugins > File extension readers changes it back.)"
    )
    note = Notification(
        message,
        severity=NotificationSeverity.INFO,
        actions=[
            ("Open slides with wsimil", lambda *_: accept_offer(settings)),
            ("No", lambda *_: decline_offer(settings)),
        ],
    )
    (dispatch or notification_manager.dispatch)(note)
    return True


def foreign_slide_path(layer: Any) -> str | None:
    """The slide file of an image layer opened by another reader (not lazy, in pixels), else None."""
    meta = layer.metadata.get(META_KEY) if isinstance(getattr(layer, "metadata", None), dict) else None
    if isinstance(meta, dict) or getattr(layer, "_type_string", None) != "image":
        return None
    source = getattr(layer, "source", None)
    path = getattr(source, "path", None)
    if not path or getattr(source, "reader_plugin", None) == PLUGIN:
        return None
    return str(path) if is_slide_path(path) else None


def mpp_problem(mpp: float | None) -> str | None:
    """Why a slide's µm per pixel cannot be used as it is (None when it is plausible): missing, or outside
    wsimil_core's ``MPP_RANGE`` (``implausible_mpp``)."""
    if mpp is None:
        return "the file gives no µm per pixel (the slide is shown in pixels and cannot be tiled)"
    return implausible_mpp(float(mpp))


def _reset_session() -> None:
    """Forget this session's offer and answer (tests)."""
    _session.update(offered=False, answer=None)


__all__ = [
    "ANSWER_FILE",
    "SLIDE_SUFFIXES",
    "ImplausibleMppWarning",
    "is_slide_path",
    "MPP_RANGE",
    "NO_OFFER_ENV",
    "PLUGIN",
    "accept_offer",
    "decline_offer",
    "foreign_slide_path",
    "missing_preferences",
    "mpp_problem",
    "offer_reader_preference",
    "remember_answer",
    "remembered_answer",
    "set_reader_preference",
    "should_offer",
    "slide_patterns",
]
