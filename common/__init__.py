"""The ground floor: conventions, atomic file writes, training view selection and image metrics,
shared by every other package. It imports nothing from them."""
