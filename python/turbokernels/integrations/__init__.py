"""Integrations with other libraries (imported lazily: turbokernels does not depend on them)."""
