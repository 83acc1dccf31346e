"""Jinja2 templates for the HTML report, shipped inside the package."""
