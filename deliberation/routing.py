from django.urls import path

from . import consumers, inputs  # noqa: F401 - inputs registers the <dbid:...> converter

websocket_urlpatterns = [
    path("ws/p/<str:code>/", consumers.ParticipantConsumer.as_asgi()),
    path("ws/monitor/<dbid:room_id>/", consumers.MonitorConsumer.as_asgi()),
]
