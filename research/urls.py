"""The researcher pages, under /researcher/ (config.urls). The room monitor is deliberation's (/researcher/rooms/)."""

from django.urls import path

from deliberation import inputs  # noqa: F401 - registers the <dbid:...> converter

from . import training_views, views

urlpatterns = [
    path("", views.researcher_home, name="researcher_home"),
    path("experiments/<slug:slug>/cohort/", views.cohort_monitor, name="cohort_monitor"),
    path("experiments/<slug:slug>/pause/", views.experiment_pause, name="experiment_pause"),
    path("experiments/<slug:slug>/analytics/", views.analytics_page, name="analytics"),
    path("experiments/<slug:slug>/analytics.csv", views.analytics_csv, name="analytics_csv"),
    path("experiments/<slug:slug>/analytics/<slug:plot>.<slug:fmt>", views.analytics_plot, name="analytics_plot"),
    path("experiments/<slug:slug>/exports/", views.exports_page, name="exports_page"),
    path("exports/<dbid:export_id>/download/", views.export_download, name="export_download"),
    path("experiments/<slug:slug>/", views.experiment_detail, name="experiment_detail"),
    path("training/", training_views.training_page, name="training_page"),
    path("training/<dbid:run_id>/", training_views.training_run_page, name="training_run"),
    path("training/<dbid:run_id>/retry/", training_views.training_run_retry, name="training_run_retry"),
    path("versions/", training_views.versions_page, name="versions_page"),
    path("versions/<dbid:version_id>/evaluate/", training_views.version_evaluate, name="version_evaluate"),
    path("arms/<dbid:arm_id>/generator-version/", training_views.arm_generator_version, name="arm_generator_version"),
]
