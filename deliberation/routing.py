from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/p/<str:code>/", consumers.ParticipantConsumer.as_asgi()),
    path("ws/monitor/<int:room_id>/", consumers.MonitorConsumer.as_asgi()),
]
