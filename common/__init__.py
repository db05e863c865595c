"""The ground floor, shared by every other package and importing nothing from them: the conventions,
atomic file writes, training views, image metrics (with LPIPS's trunks) and PNG writing."""
