from django.apps import AppConfig


class SimulationConfig(AppConfig):
    """Bots that take part through the real pages and sockets, the local site they use, simulate_cohort."""

    name = "simulation"
    default_auto_field = "django.db.models.BigAutoField"
