"""Assembly: settings, the server built from small steps, `python -m service`, the container health probe."""
