"""mtnlg.plan."""
