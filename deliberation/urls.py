from django.urls import path

from . import inputs, views, views_protocol  # noqa: F401 - inputs registers the <dbid:...> converter

urlpatterns = [
    path("", views.home, name="home"),
    path("e/<slug:slug>/join/", views.join, name="join"),
    path("e/<slug:slug>/r/<str:room_code>/join/", views.join, name="join_room"),
    path("resume/<str:token>/", views.seat_resume, name="seat_resume"),
    path("p/<str:code>/", views.participant_page, name="participant"),
    path("p/<str:code>/opinion/", views.opinion_submit, name="opinion_submit"),
    path("p/<str:code>/draft/", views.opinion_draft, name="opinion_draft"),
    path("p/<str:code>/rate/<dbid:candidate_id>/", views.rating_submit, name="rating_submit"),
    path("p/<str:code>/rank/", views.ranking_submit, name="ranking_submit"),
    path("p/<str:code>/prefer/", views.preference_submit, name="preference_submit"),
    path("p/<str:code>/opinion-rating/<dbid:opinion_id>/", views.opinion_rating_submit, name="opinion_rating_submit"),
    path("p/<str:code>/attention/", views.attention_submit, name="attention_submit"),
    path("p/<str:code>/position/", views_protocol.position_submit, name="position_submit"),
    path("p/<str:code>/closing/", views_protocol.closing_submit, name="closing_submit"),
    path("p/<str:code>/statement/", views_protocol.mediator_statement_submit, name="mediator_statement_submit"),
    path("researcher/rooms/<dbid:room_id>/", views.room_monitor, name="room_monitor"),
    path("researcher/rooms/<dbid:room_id>/mediate/", views_protocol.room_mediate, name="room_mediate"),
    path("researcher/rooms/<dbid:room_id>/start/", views.room_start, name="room_start"),
    path("researcher/participants/<dbid:participant_id>/move-seat/", views.seat_transfer_issue, name="seat_transfer_issue"),
]
