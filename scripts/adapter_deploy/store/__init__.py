"""Training-side version store: manifest, git+DVC registry, versioning, conversions."""
