"""Integrations with other libraries (imported on demand: ``crossattn.integrations.transformers``)."""
