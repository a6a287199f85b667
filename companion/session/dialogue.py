"""The text side of a conversation with an LLM: what the user said and what the companion said back.

Each exchange is the user's line and the reply *as spoken* (the sentences that were voiced), with
``partial`` set when the reply was cut short (interrupted, or the server failed in the middle). The
memory is bounded like the audio context: the last ``max_exchanges`` exchanges, and older ones are
dropped while the total is over ``max_chars`` characters (the newest one always stays).
"""

from __future__ import annotations

from companion.store import Exchange

__all__ = ["Dialogue", "Exchange"]


class Dialogue:
    def __init__(self, max_exchanges: int = 12, max_chars: int = 16000) -> None:
        self.max_exchanges = max_exchanges
        self.max_chars = max_chars
        self.exchanges: list[Exchange] = []

    def messages(self, system_prompt: str | None, user_text: str | None = None) -> list[dict[str, str]]:
        """The chat-completions message list: system prompt, the exchanges kept, then ``user_text``."""
        out = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for ex in self.exchanges:
            out += [{"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.reply}]
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def put(self, exchange: Exchange) -> None:
        """Add ``exchange``, or replace the one with its ``seq`` (a reply growing sentence by sentence)."""
        if exchange.seq and self.exchanges and self.exchanges[-1].seq == exchange.seq:
            self.exchanges[-1] = exchange
        else:
            self.exchanges.append(exchange)
        while len(self.exchanges) > self.max_exchanges or (
            len(self.exchanges) > 1 and sum(len(e.user) + len(e.reply) for e in self.exchanges) > self.max_chars
        ):
            self.exchanges.pop(0)

    def clear(self) -> None:
        self.exchanges.clear()
