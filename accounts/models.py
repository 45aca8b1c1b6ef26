"""Who shares which experiment: collaborators, with a role (viewer or editor).

The experiment is referenced by its label ("deliberation.Experiment"): accounts sits below the
rooms in the layering and imports none of their models.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Collaboration(models.Model):
    """A researcher who shares an experiment they do not own: viewers see it; editors may also change it."""

    class Role(models.TextChoices):
        VIEWER = "viewer", "Viewer (sees the experiment, its rooms, analytics and pseudonymised exports)"
        EDITOR = "editor", "Editor (may also pause, resume and export, external ids included)"

    experiment = models.ForeignKey("deliberation.Experiment", on_delete=models.CASCADE, related_name="collaborations")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="collaborations")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["experiment", "user"], name="one_collaboration_per_user_and_experiment")]

    def __str__(self) -> str:
        return f"{self.user} ({self.role}) on experiment {self.experiment_id}"
