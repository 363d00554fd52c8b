"""mtnlg.eval."""
