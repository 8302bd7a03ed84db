"""`python -m benchmarks.render`: time the Markdown converter, the splitter and mention
handling on pathological replies at growing sizes (linear work doubles with the size)."""

from __future__ import annotations

import time
from collections.abc import Callable

from telegram import Chat, Message, MessageEntity, User

from adapters.telegram.addressing import BotIdentity, addressed_text
from adapters.telegram.format import markdown_to_html
from bot.render import split_markdown, utf16_len

SHAPES: dict[str, Callable[[int], str]] = {
    "brackets": lambda n: "[" * n,
    "nested links": lambda n: "[" * (n // 11) + "x" + "](mailto:)" * (n // 11),
    "emphasis": lambda n: "_a " * (n // 6) + "a* " * (n // 6),
    "backtick runs": lambda n: "".join("`" * k + " x " for k in range(1, int((2 * n) ** 0.5))),
    "heading spaces": lambda n: "# " + " " * n + "x",
    "fence info": lambda n: "```" + "a" * n + "`",
    "prose": lambda n: ("Some **bold** and `code` with a [link](https://e.org). " * n)[:n],
}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mentions(count: int) -> Message:
    text = "@x " * count + "@me hi"
    entities = [MessageEntity(MessageEntity.MENTION, 3 * i, 2) for i in range(count)]
    entities.append(MessageEntity(MessageEntity.MENTION, 3 * count, 3))
    chat = Chat(-100, Chat.SUPERGROUP)
    return Message(1, None, chat, from_user=User(5, "u", False), text=text,  # type: ignore[arg-type]
                   entities=entities)


def main() -> None:
    print(f"{'shape':16} {'chars':>8} {'convert s':>10} {'split s':>9}")
    for name, make in SHAPES.items():
        for n in (25_000, 50_000, 100_000):
            text = make(n)
            convert = _time(lambda text=text: markdown_to_html(text))
            split = _time(lambda text=text: split_markdown(text, 4096, utf16_len))
            print(f"{name:16} {len(text):8} {convert:10.3f} {split:9.3f}")
    me = BotIdentity(1, "me")
    for count in (12_500, 25_000, 50_000):
        message = _mentions(count)
        took = _time(lambda message=message: addressed_text(message, me, ()))
        print(f"{'mentions':16} {count:8} {took:10.3f}")


if __name__ == "__main__":
    main()
