"""Prefect tasks: thin typed verbs over plain functions that can be tested without Prefect."""
