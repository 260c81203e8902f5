"""
A listener for the browser chat in ``index.html``.

Run it from this directory (``PYTHONPATH=.`` lets twistd import this file)::

    PYTHONPATH=. twistd -n sockdrawer --listener chat_listener:Chat

- A frame a browser sends on ``/chat`` is re-published on the ``chat``
  channel, so every browser on ``/chat`` (on every node) sees it.
- A frame sent on ``/echo`` is answered to that browser only.
"""

from sockdrawer import Subscriber, on


class Chat(Subscriber):
    @on("chat")
    def chat(self, message, source):
        # Messages published on the chat channel (including the ones this
        # handler publishes) come back here with source.from_socket False:
        # only re-publish what a browser sent, or it would loop forever.
        if source.from_socket:
            self.publish(message, channel="chat")

    @on("echo")
    def echo(self, message, source):
        # The return value goes back to the socket that sent the frame
        # (and is ignored for messages published on the broker).
        return message
