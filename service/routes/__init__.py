"""One router per resource: features, adapters, health, and the viewer page."""
