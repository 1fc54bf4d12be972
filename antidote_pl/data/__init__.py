"""Data: prompt templates, record sources, collators and the LightningDataModules."""
