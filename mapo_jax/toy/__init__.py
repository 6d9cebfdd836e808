"""The toy world: shapes, its judge, the tiny pretrained base, the demo's assets and preference runs on it."""
