"""Recipes are data: one TOML file per model family. This file only makes the folder installable as
``aotpack.recipes`` so that the recipes ship inside the wheel."""
