from django.apps import AppConfig


class ResearchConfig(AppConfig):
    """What researchers use around the rooms: the question bank, cohorts, analytics and exports."""

    name = "research"
    default_auto_field = "django.db.models.BigAutoField"
