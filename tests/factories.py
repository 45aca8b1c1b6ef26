"""factory_boy factories for the deliberation data model."""

from __future__ import annotations

import factory
from django.contrib.auth import get_user_model

from deliberation.models import Arm, Experiment, Participant, Question, Room, Round


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ["username"]

    username = factory.Sequence(lambda n: f"researcher{n}")
    password = factory.django.Password("pw-for-tests")


class QuestionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Question

    external_id = factory.Sequence(lambda n: f"q-{n}")
    text = "Should we raise taxes on the rich?"
    affirming_statement = "We should raise taxes on the rich."
    negating_statement = "We should not raise taxes on the rich."
    topic = "economy"
    split = "train"


class ExperimentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Experiment
        skip_postgeneration_save = True

    slug = factory.Sequence(lambda n: f"experiment-{n}")
    name = factory.Sequence(lambda n: f"Experiment {n}")
    owner = factory.SubFactory(UserFactory)
    group_size = 3
    opinion_seconds = 300
    rating_seconds = 600

    @factory.post_generation
    def with_question_and_arm(self, create: bool, extracted: object, **kwargs: object) -> None:
        if not create:
            return
        if not self.questions.exists():
            self.questions.add(QuestionFactory())
        if not self.arms.exists():
            ArmFactory(experiment=self)


class ArmFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Arm

    experiment = factory.SubFactory(ExperimentFactory)
    name = factory.Sequence(lambda n: f"arm-{n}")
    n_candidates = 4
    k_shown = 2


class RoomFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Room
        skip_postgeneration_save = True

    experiment = factory.SubFactory(ExperimentFactory)
    arm = factory.LazyAttribute(lambda room: room.experiment.arms.first())
    question = factory.LazyAttribute(lambda room: room.experiment.questions.first())
    capacity = factory.LazyAttribute(lambda room: room.experiment.group_size)

    @factory.post_generation
    def first_round(self, create: bool, extracted: object, **kwargs: object) -> None:
        if create and not self.rounds.exists():
            Round.objects.create(room=self, index=0, seed=1234)


class ParticipantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Participant

    room = factory.SubFactory(RoomFactory)
    label = factory.Sequence(lambda n: f"Participant {n}")
