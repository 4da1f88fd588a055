"""One router per resource: features, adapters, health."""
