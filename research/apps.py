from django.apps import AppConfig


class ResearchConfig(AppConfig):
    """What researchers use around the rooms: the question bank, cohorts, analytics and exports."""

    name = "research"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The recovery sweep (deliberation.recovery) also fails training runs whose worker died; it calls
        # the check by name, since deliberation may not import research.
        from deliberation.recovery import recovery_check_register

        from .training import sweep_training_runs

        recovery_check_register(name="training_runs", check=sweep_training_runs)
