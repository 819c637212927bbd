"""Every class chatzeo offers an application provides its interface (zope.interface.verify)."""

from __future__ import annotations

import pytest
import transaction
import ZODB
from ZODB.MappingStorage import MappingStorage
from zope.interface.verify import verifyClass, verifyObject

import chatzeo
from chatzeo import interfaces


@pytest.mark.parametrize(
    ("interface", "cls"),
    [
        (interfaces.IMessage, chatzeo.Message),
        (interfaces.IChatSession, chatzeo.ChatSession),
        (interfaces.IReadMarkers, chatzeo.ReadMarkers),
        (interfaces.IMessagePosted, chatzeo.MessagePosted),
        (interfaces.ISubscribers, chatzeo.events.Subscribers),
        (interfaces.IChangeFeed, chatzeo.ChangeFeed),
        (interfaces.IWatch, chatzeo.Watch),
        (interfaces.IAsyncWatch, chatzeo.AsyncWatch),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_class_implements_its_interface(interface, cls):
    assert interface.implementedBy(cls)
    assert verifyClass(interface, cls)


def test_live_objects_provide_their_interfaces_with_every_attribute():
    db = ZODB.DB(MappingStorage())
    heard: list[chatzeo.MessagePosted] = []
    unsubscribe = chatzeo.subscribe(heard.append)
    try:
        connection = db.open()
        room = chatzeo.get_root(connection).room("general")
        transaction.commit()
        message = room.add_message("hi", "alice")
        transaction.begin()
        markers = chatzeo.ReadMarkers()
        watching = chatzeo.watch(db, room)
        for interface, obj in [
            (interfaces.IMessage, message),
            (interfaces.IChatSession, room),
            (interfaces.IReadMarkers, markers),
            (interfaces.IMessagePosted, heard[0]),
            (interfaces.ISubscribers, chatzeo.subscribers),
            (interfaces.IChangeFeed, watching._feed),
            (interfaces.IWatch, watching),
            (interfaces.IAsyncWatch, chatzeo.awatch(db, room)),
        ]:
            assert verifyObject(interface, obj), interface
        watching.close()
        transaction.abort()
        connection.close()
    finally:
        unsubscribe()
        db.close()
