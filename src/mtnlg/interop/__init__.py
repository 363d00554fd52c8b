"""mtnlg.interop."""
