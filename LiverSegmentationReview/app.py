"""``liverseg review``: a study's cases in the browser, on Slicer's own core (trame-slicer).

A thin front end: the case list, opening, segmenting, the readout after each edit, Accept and the
fine-tuning queue are decided by ``LiverSegmentationLib`` (the study review and the Slicer panel's
controller), exactly as in the Slicer panel. This file only lays out the page and binds its
buttons, keys and views to those objects.
"""

from __future__ import annotations

import asyncio
import sys
import types
from pathlib import Path
from typing import Callable, Optional

from trame.app import TrameApp
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import (
    SegmentationEffectErase,
    SegmentationEffectIslands,
    SegmentationEffectNoTool,
    SegmentationEffectPaint,
    SegmentationEffectScissors,
)
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from undo_stack import UndoStack
from vtkmodules.vtkCommonCore import vtkObject

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LiverSegmentation"))  # LiverSegmentationLib
from LiverSegmentationLib import panel_controller as pc  # noqa: E402
from LiverSegmentationLib.study_review import StudyReview  # noqa: E402

TOOLS = {  # button id -> (effect, icon, title)
    "none": (SegmentationEffectNoTool, "mdi-cursor-default", "Navigate (Esc)"),
    "paint": (SegmentationEffectPaint, "mdi-brush", "Paint (B)"),
    "erase": (SegmentationEffectErase, "mdi-eraser", "Erase (E)"),
    "scissors": (SegmentationEffectScissors, "mdi-content-cut", "Scissors (S)"),
}

# keys the page sends to the server (not while typing in a field)
KEYS_SCRIPT = """
document.addEventListener('keydown', (event) => {
  const tag = (event.target && event.target.tagName) || '';
  if (tag === 'INPUT' || tag === 'TEXTAREA' || event.altKey || event.metaKey) return;
  const key = (event.ctrlKey ? 'ctrl+' : '') + (event.shiftKey ? 'shift+' : '') + event.key.toLowerCase();
  window.trame.trigger('review_key', [key]);
});
"""


def bind_slicer_modules(slicer_app: SlicerApp):
    """``slicer.mrmlScene`` and the module logics the MRML bridge uses, as the Slicer application
    binds them."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    slicer.mrmlScene = slicer_app.scene
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: slicer_app.segmentations_logic),
        volumes=types.SimpleNamespace(logic=lambda: slicer_app.volumes_logic),
    )


class ReviewApp(TrameApp):
    """The review page of one study.

    Args:
        study, out: the study folder and its results folder (see ``StudyReview``).
        settings: panel settings (backend, serverAddress, model, study, queueFolder, operatorName...).
    """

    def __init__(self, study, out, settings: dict, server=None):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        vtkObject.GlobalWarningDisplayOff()  # offscreen rendering's X11 fallback notes are not the operator's
        bind_slicer_modules(self.slicer_app)
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        axial, coronal, sagittal = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                                    ViewLayoutDefinition.sagittal_view())
        beside = Layout(LayoutDirection.Vertical, [coronal, sagittal])
        self.layout_manager.register_layout("review", Layout(LayoutDirection.Horizontal, [axial, beside]))
        self.layout_manager.set_layout("review")
        self.editor = self.slicer_app.segmentation_editor
        self.undo = UndoStack(undo_limit=30)
        self.editor.set_undo_stack(self.undo)
        self.editor.segmentation_modified.connect(self._on_edited)

        store = pc.PanelSettings(pc.DictSettings())
        for key, value in settings.items():
            store[key] = value
        self.controller = pc.PanelController(store)
        self.review = StudyReview(study, out, self.controller, self.slicer_app.scene)
        self._flagged_slice = -1  # the slice to check that F went to last, in the open case
        self._init_state()
        self._build_ui()
        self.server.controller.on_server_ready.add(self._start_ticking)
        self.server.trigger("review_key")(self.on_key)

    # ------------------------------------------------------------------ state shown on the page
    def _init_state(self):
        s = self.state
        s.trame__title = f"Review: {self.review.study.name}"
        s.cases, s.current_case, s.status, s.error = [], None, "", ""
        s.progress, s.running, s.readout_html, s.slices = 0, False, "Open a case.", []
        s.operator = self.controller.settings["operatorName"]
        s.active_tool, s.can_undo, s.can_redo, s.has_segmentation = "none", False, False, False
        s.change("operator")(self._on_operator)
        self._sync()

    def _sync(self):
        """Copy what the controller and the review know into the page's state (changed keys only)."""
        c, r = self.controller, self.review
        done, total = c.progress
        values = {
            "cases": [{"case": e.case, "status": e.status, "quality": e.quality,
                       "reasons": "; ".join(e.reasons)} for e in r.cases],
            "current_case": r.current.case if r.current else None,
            "status": c.status,
            "running": c.running,
            "progress": int(100 * done / total) if total else 0,
            "readout_html": pc.readout_html(c.readout, c.readout_error, r.segmentation_node)
            if r.current else "Open a case.",
            "slices": [s["slice"] for s in r.slices_to_check],
            "has_segmentation": r.segmentation_node is not None,
            "can_undo": self.undo.can_undo(),
            "can_redo": self.undo.can_redo(),
        }
        with self.state:
            for key, value in values.items():
                if self.state[key] != value:
                    self.state[key] = value

    def _run(self, action, *args):
        """Run a page action; what goes wrong is a message on the page, never a dead page."""
        self.state.error = ""
        try:
            action(*args)
        except pc.PanelError as exc:
            self.state.error = str(exc)
        except Exception as exc:  # noqa: BLE001 (an unexpected failure is shown, and the page stays)
            self.state.error = f"{type(exc).__name__}: {exc}"
        self._sync()

    # ------------------------------------------------------------------ actions
    def open_case(self, case: str):
        self._run(self._open, case)

    def _open(self, case: str):
        def let_go():  # the editor lets go of the nodes about to be removed
            self.editor.clear()
            self.state.active_tool = "none"

        self.review.open(case, closing=let_go)
        self._flagged_slice = -1
        self._show()

    def _show(self):
        r, display = self.review, self.slicer_app.display_manager
        display.show_volume_in_slice_background(r.input_node)
        if r.segmentation_node is not None:
            self.editor.set_active_segmentation(r.segmentation_node, r.input_node)
        display.reset_views()

    def step_case(self, step: int):
        case = self.review.neighbour(step)
        if case is not None:
            self.open_case(case)

    def segment(self):
        self._run(self.review.segment)

    def cancel(self):
        self._run(self.controller.cancel)

    def accept(self, queue: bool = False):
        self._run(self.review.accept, queue)

    def jump(self, index: int):
        self._run(self.review.jump_to, index)

    def next_flagged_slice(self):
        slices = self.review.slices_to_check
        if slices:
            self._flagged_slice = (self._flagged_slice + 1) % len(slices)
            self.jump(self._flagged_slice)

    def _require_segmentation(self):
        if self.review.segmentation_node is None:
            raise pc.PanelError("segment the case before editing")

    def set_tool(self, tool: str):
        def activate():
            if tool != "none":
                self._require_segmentation()
            self.editor.set_active_effect_type(TOOLS[tool][0])
            self.state.active_tool = tool

        self._run(activate)

    def keep_largest_island(self):
        def keep():
            self._require_segmentation()
            self.editor.set_active_effect_type(SegmentationEffectIslands).keep_largest_island()
            self.editor.set_active_effect_type(TOOLS[self.state.active_tool][0])

        self._run(keep)

    def undo_edit(self):
        self._run(lambda: self.undo.can_undo() and self.undo.undo())

    def redo_edit(self):
        self._run(lambda: self.undo.can_redo() and self.undo.redo())

    def on_key(self, key: str):
        actions = {"n": lambda: self.step_case(+1), "p": lambda: self.step_case(-1), "f": self.next_flagged_slice,
                   "b": lambda: self.set_tool("paint"), "e": lambda: self.set_tool("erase"),
                   "s": lambda: self.set_tool("scissors"), "escape": lambda: self.set_tool("none"),
                   "ctrl+z": self.undo_edit, "ctrl+y": self.redo_edit, "ctrl+shift+z": self.redo_edit}
        if key in actions:
            actions[key]()

    def _on_operator(self, operator, **_):
        self.controller.settings["operatorName"] = operator or ""

    def _on_edited(self, *_):
        self.review.edited()

    # ------------------------------------------------------------------ the timer
    def _start_ticking(self, **_):
        asyncio.get_event_loop().create_task(self._tick_forever())

    async def _tick_forever(self):
        while True:
            await asyncio.sleep(0.1)
            try:
                if self.review.tick():
                    self._show()
            except Exception as exc:  # noqa: BLE001
                self.state.error = f"{type(exc).__name__}: {exc}"
            self._sync()

    # ------------------------------------------------------------------ the page
    def _build_ui(self):
        with VAppLayout(self.server, theme="dark") as self.ui:
            client.Script(KEYS_SCRIPT)
            client.Style("html { overflow-y: hidden; } .case-row { cursor: pointer; }")
            with v3.VAppBar(density="compact"):
                v3.VToolbarTitle(f"Review: {self.review.study.name}")
                v3.VBtn(icon="mdi-chevron-left", id="btn-prev", click=(self.step_case, "[-1]"),
                        title="Previous case (P)")
                v3.VBtn(icon="mdi-chevron-right", id="btn-next", click=(self.step_case, "[1]"), title="Next case (N)")
                v3.VBtn("Segment", id="btn-segment", prepend_icon="mdi-play", click=self.segment,
                        disabled=("running || !current_case",))
                v3.VBtn("Cancel", id="btn-cancel", click=self.cancel, v_if=("running",))
                v3.VTextField(v_model=("operator",), label="Operator", id="operator", density="compact",
                              hide_details=True, max_width=180, classes="mx-2")
                v3.VBtn("Accept", id="btn-accept", prepend_icon="mdi-check", click=(self.accept, "[false]"),
                        disabled=("running || !has_segmentation",))
                v3.VBtn("Accept + queue", id="btn-accept-queue", prepend_icon="mdi-tray-arrow-up",
                        click=(self.accept, "[true]"), disabled=("running || !has_segmentation",),
                        title="Accept and send the corrected case to the fine-tuning queue")
            with v3.VNavigationDrawer(permanent=True, width=340):
                v3.VAlert(v_if=("error",), text=("error",), type="error", density="compact", id="error",
                          closable=True, classes="ma-2")
                html.Div("{{ status }}", id="status", classes="text-body-2 ma-2")
                v3.VProgressLinear(v_if=("running",), model_value=("progress",), id="progress", height=6)
                html.Div(v_html=("readout_html",), id="readout", classes="text-body-2 ma-2")
                with html.Div(classes="ma-2", v_if=("slices.length",)):
                    html.Span("Slices to check (F): ", classes="text-caption")
                    v3.VChip("{{ z }}", v_for="(z, i) in slices", key="i", size="small", classes="ma-1",
                             click=(self.jump, "[i]"), id=("`slice-${i}`",))
                v3.VDivider()
                with v3.VList(density="compact", id="cases"):
                    with v3.VListItem(v_for="item in cases", key="item.case", classes="case-row",
                                      active=("item.case === current_case",), click=(self.open_case, "[item.case]"),
                                      id=("`case-${item.case}`",)):
                        v3.VListItemTitle("{{ item.case }}")
                        v3.VListItemSubtitle("{{ item.status }}{{ item.reasons ? ': ' + item.reasons : '' }}")
                        with v3.Template(v_slot_append=True):
                            v3.VChip("{{ item.quality }}", v_if=("item.quality",), size="x-small",
                                     color=("item.quality === 'ok' ? 'green' : 'red'",))
            with v3.VNavigationDrawer(permanent=True, width=48, location="right"):
                for tool, (_, icon, title) in TOOLS.items():
                    v3.VBtn(icon=icon, id=f"tool-{tool}", title=title, variant="text",
                            click=(self.set_tool, f"['{tool}']"), active=(f"active_tool === '{tool}'",),
                            disabled=("!has_segmentation",))
                v3.VBtn(icon="mdi-island", id="tool-islands", title="Keep the largest island", variant="text",
                        click=self.keep_largest_island, disabled=("!has_segmentation",))
                v3.VBtn(icon="mdi-undo", id="btn-undo", title="Undo (Ctrl+Z)", variant="text", click=self.undo_edit,
                        disabled=("!can_undo",))
                v3.VBtn(icon="mdi-redo", id="btn-redo", title="Redo (Ctrl+Y)", variant="text", click=self.redo_edit,
                        disabled=("!can_redo",))
            with v3.VMain(), html.Div(style="height: calc(100vh - 48px); display: flex;"):
                self.layout_manager.initialize_layout_grid(self.ui)


def serve(study, out, settings: dict, port: int = 8080, host: str = "127.0.0.1", token: Optional[str] = None,
          on_ready: Optional[Callable[[int], None]] = None) -> int:
    """Start the review page; blocks until the server stops (Ctrl-C). ``on_ready`` gets the port."""
    try:
        app = ReviewApp(study, out, settings)
    except pc.PanelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if token:  # wslink checks it at the web socket's handshake; the page sends what ?secret= says
        app.server.cli.set_defaults(authKey=token)
    if on_ready is not None:
        app.server.controller.on_server_ready.add(lambda **_: on_ready(app.server.port))
    argv, sys.argv = sys.argv, sys.argv[:1]  # trame reads its own options from the command line
    try:
        app.server.start(port=port, host=host, open_browser=False, show_connection_info=False, timeout=0)
    finally:
        sys.argv = argv
    return 0
