"""Workbench views: `pn.viewable.Viewer`s drawing per-session state; none of them imports torch."""
