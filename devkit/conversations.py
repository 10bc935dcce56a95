"""Realistic sample chat logs for the demo and the tests, and a style score to measure an adapter's effect.

Every reply is built from the same topic pool in one of three voices:

* ``generic`` — plain, helpful, neutral. The embedded base model is pretrained on this voice only
  (:func:`generic_dialogue`), so it does not already talk like a character.
* ``lumina`` — warm, polite, loves the stars; Japanese with some English.
* ``sora`` — terse and dry; short sentences.

A character's history mixes in-voice replies with some off-voice ones (the generic voice or the other character's),
and exactly those off-voice replies carry thumbs-down feedback, so a trainer that drops thumbs-down pairs learns a
cleaner voice. :func:`style_score` measures the share of replies that carry a character's markers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path


@dataclass(frozen=True)
class Topic:
    """One everyday subject, named in both languages, with two pieces of advice a reply can build on.

    Japanese tips are verb phrases in dictionary form ("…する"), English tips bare infinitives ("take …"), so every
    voice can fit them into its own sentence frames.
    """

    ja: str
    en: str
    ja_tips: tuple[str, str]
    en_tips: tuple[str, str]


TOPICS: tuple[Topic, ...] = (
    Topic("天気", "the weather", ("出かける前に予報を確認する", "折りたたみ傘を持っていく"),
          ("check the forecast before going out", "keep a small umbrella in your bag")),
    Topic("コーヒー", "coffee", ("温かいうちにゆっくり飲む", "午後は一杯だけにしておく"),
          ("drink it slowly while it is warm", "keep it to one cup in the afternoon")),
    Topic("お茶", "tea", ("少しぬるめのお湯でいれる", "お菓子と一緒に休憩する"),
          ("brew it with water that is not too hot", "take a short break with a snack")),
    Topic("朝ごはん", "breakfast", ("前の晩に少しだけ準備しておく", "果物をひとつ足してみる"),
          ("prepare a little the night before", "add a piece of fruit")),
    Topic("料理", "cooking", ("簡単なスープから始めてみる", "週末にまとめて作っておく"),
          ("start with a simple soup", "cook a few dishes ahead on the weekend")),
    Topic("仕事", "work", ("やることを三つに絞って書き出す", "一時間ごとに短い休憩をとる"),
          ("write down the three most important tasks", "take a short break every hour")),
    Topic("勉強", "studying", ("毎日同じ時間に少しずつ進める", "覚えたことを誰かに説明してみる"),
          ("study a little at the same time every day", "explain what you learned to someone")),
    Topic("睡眠", "sleep", ("寝る前にスマホを置いておく", "毎朝同じ時間に起きる"),
          ("put your phone away before bed", "get up at the same time every morning")),
    Topic("散歩", "walking", ("近所の知らない道を歩いてみる", "朝の涼しい時間に出かける"),
          ("try a street you have never walked", "go out in the cool morning")),
    Topic("運動", "exercise", ("軽いストレッチから始める", "好きな音楽を聴きながら体を動かす"),
          ("begin with some light stretching", "move along to music you like")),
    Topic("旅行", "travel", ("行きたい場所をひとつだけ決める", "荷物を少なめにまとめる"),
          ("choose just one place you really want to see", "pack light")),
    Topic("音楽", "music", ("知らないジャンルを一曲聴いてみる", "作業用のプレイリストを作る"),
          ("listen to one song from a new genre", "make a playlist for working")),
    Topic("本", "books", ("寝る前に数ページだけ読む", "友だちにおすすめを聞いてみる"),
          ("read a few pages before bed", "ask a friend for a recommendation")),
    Topic("映画", "movies", ("週末に一本だけ選んで観る", "観たあとに感想をメモする"),
          ("pick one film for the weekend", "write a short note after watching")),
    Topic("猫", "cats", ("静かな場所で休ませてあげる", "新しいおもちゃで遊んであげる"),
          ("let them rest somewhere quiet", "play with a new toy together")),
    Topic("買い物", "shopping", ("買うものを先にリストにする", "お店が空いている時間に行く"),
          ("make a list before you go", "go when the shop is quiet")),
    Topic("掃除", "cleaning", ("毎日五分だけ片付ける", "窓を開けて空気を入れかえる"),
          ("tidy up for five minutes a day", "open the windows to let in fresh air")),
    Topic("週末", "the weekend", ("午前中に小さな予定をひとつ入れる", "何もしない時間もつくる"),
          ("plan one small thing for the morning", "leave some time to do nothing")),
    Topic("友だち", "friends", ("久しぶりにメッセージを送ってみる", "一緒にごはんに行く約束をする"),
          ("send a message to someone you miss", "make a plan to eat together")),
    Topic("ゲーム", "games", ("時間を決めて遊ぶ", "友だちと協力するゲームを選ぶ"),
          ("set a time limit before you play", "pick a game you can play with friends")),
    Topic("雨", "rainy days", ("家で温かい飲み物をいれる", "濡れてもいい靴で出かける"),
          ("make a warm drink at home", "wear shoes that can get wet")),
    Topic("花", "flowers", ("窓辺に小さな鉢を置く", "水やりの日を決めておく"),
          ("put a small pot by the window", "choose fixed days for watering")),
    Topic("写真", "photography", ("朝の光で撮ってみる", "毎日一枚だけ撮る")
          , ("take pictures in the morning light", "take just one photo every day")),
    Topic("引っ越し", "moving house", ("使わない物を先に手放す", "箱に中身を書いておく"),
          ("give away what you do not use first", "label every box with what is inside")),
)

# User prompts. A session opens with an opener and may continue with follow-ups about the same topic; the held-out
# templates never appear in generated histories, so the demo's before/after prompts are new to an adapter.
JA_OPENERS = (
    "{ja}について話しませんか？", "最近{ja}のことが気になっています。", "{ja}のおすすめってありますか？",
    "今日は{ja}の話をしたいな。", "{ja}、どう思いますか？", "{ja}で何かいい方法はある？",
    "ねえ、{ja}ってどうしたらいい？", "{ja}のこと、相談してもいい？",
)
EN_OPENERS = (
    "Can we talk about {en}?", "Any tips for {en}?", "What do you think about {en}?",
    "I have been thinking about {en} lately.", "How should I approach {en}?", "Tell me something about {en}.",
)
JA_FOLLOW_UPS = ("ほかには何かある？", "もう少し詳しく教えて。", "それ、やってみようかな。", "なんでそう思うの？")
EN_FOLLOW_UPS = ("Anything else?", "Could you say a bit more?", "I might try that.", "Why do you think so?")
JA_HELD_OUT = ("{ja}で困っているんだけど、どうしよう？", "{ja}を楽しむコツを教えてください。")
EN_HELD_OUT = ("I need some advice on {en}.", "What is the best part of {en}?")


def _tip(topic: Topic, lang: str, turn: int) -> str:
    # Follow-up replies use the other tip, so a session's answers do not repeat themselves.
    tips = topic.ja_tips if lang == "ja" else topic.en_tips
    return tips[turn % 2]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Voice:
    """How one voice speaks in one language: a reply is ``opener + core + closer``.

    ``core`` carries the content (the topic and a tip); openers and closers carry most of the voice. lumina shares
    its polite cores with the generic voice, so an adapter mostly has to learn the character's framing, as with a
    real base model that already knows how to give advice.
    """

    openers: tuple[str, ...]
    cores: tuple[Callable[[Topic, str], str], ...]
    closers: tuple[str, ...]
    separator: str = ""


_POLITE_JA = (
    lambda t, tip: f"{t.ja}なら、{tip}のがおすすめです。",
    lambda t, tip: f"{t.ja}については、{tip}といいと思います。",
    lambda t, tip: f"{t.ja}は、{tip}と続けやすいですよ。",
    lambda t, tip: f"まず{tip}ところから始めてみてください。",
)
_POLITE_EN = (
    lambda t, tip: f"For {t.en}, I would suggest you {tip}.",
    lambda t, tip: f"When it comes to {t.en}, it often helps to {tip}.",
    lambda t, tip: f"A simple idea for {t.en}: {tip}.",
    lambda t, tip: f"You could {tip}; it usually works well.",
)

_VOICES: dict[str, dict[str, Voice]] = {
    "generic": {
        "ja": Voice(
            ("いい質問です。", "なるほど。", ""),
            _POLITE_JA,
            ("", "参考になればうれしいです。", "無理のない範囲でどうぞ。"),
        ),
        "en": Voice(
            ("Good question. ", "I see. ", ""),
            _POLITE_EN,
            ("", "I hope that helps.", "Take it at your own pace."),
            separator=" ",
        ),
    },
    "lumina": {
        "ja": Voice(
            ("わあ✨ ", "ふふ、", "きらきらな質問ですね！ ", "こんばんは〜、"),
            _POLITE_JA,
            ("星もきっと応援していますよ✨", "今夜の星みたいに、きらきらな一日になりますように☆",
             "いっしょにがんばりましょう〜ね✨", "空の星も見守っていますよ〜"),
        ),
        "en": Voice(
            ("Oh, how lovely! ✨ ", "Hehe, ", "What a sparkly question! "),
            _POLITE_EN,
            ("The stars are cheering for you ✨", "May your day twinkle like the stars ☆",
             "Let's look up at the stars tonight〜ね"),
            separator=" ",
        ),
    },
    "sora": {
        "ja": Voice(
            ("……", "別に。", "ふーん。", "そう。"),
            (lambda t, tip: f"{tip}。", lambda t, tip: f"{t.ja}なら{tip}。", lambda t, tip: f"{tip}とか。"),
            ("", "それだけ。", "……まあ、いいけど。", "以上。"),
        ),
        "en": Voice(
            ("... ", "whatever. ", "Meh... "),
            # Lower case after the opener: sora does not bother with capitals.
            (lambda t, tip: f"{tip}.", lambda t, tip: f"just {tip}.", lambda t, tip: f"{t.en}? {tip}."),
            ("", "that's it.", "... fine."),
            separator=" ",
        ),
    },
}

VOICES: tuple[str, ...] = tuple(_VOICES)
CHARACTERS: tuple[str, ...] = ("lumina", "sora")

# A reply carries a character's style when it contains at least one of these substrings (case-insensitive).
MARKERS: dict[str, tuple[str, ...]] = {
    "lumina": ("星", "きらきら", "✨", "☆", "〜ね", "stars", "twinkl"),
    "sora": ("……", "別に", "ふーん", "そう。", "...", "whatever"),
}

# Share of each character's sessions held in Japanese (the rest in English).
_JA_SHARE = {"lumina": 0.75, "sora": 0.8}


def reply(voice: str, topic: Topic, lang: str, rng: random.Random, turn: int = 0) -> str:
    """One reply in ``voice`` about ``topic`` in ``lang`` ("ja" or "en")."""
    spec = _VOICES[voice][lang]
    core = rng.choice(spec.cores)(topic, _tip(topic, lang, turn))
    closer = rng.choice(spec.closers)
    return (rng.choice(spec.openers) + core + (spec.separator + closer if closer else "")).strip()


def _opener(topic: Topic, lang: str, rng: random.Random, templates: Sequence[str] | None = None) -> str:
    pool = templates if templates is not None else (JA_OPENERS if lang == "ja" else EN_OPENERS)
    return rng.choice(pool).format(ja=topic.ja, en=topic.en)


def _next_prompt(
    topic: Topic, lang: str, rng: random.Random, turn: int, openers: Sequence[str] | None = None
) -> tuple[Topic, str]:
    """A session's user message at ``turn``: an opener first, then mostly follow-ups, now and then a new topic."""
    if turn == 0:
        return topic, _opener(topic, lang, rng, openers)
    if rng.random() < 0.2:
        topic = rng.choice(TOPICS)
        return topic, _opener(topic, lang, rng, openers)
    return topic, rng.choice(JA_FOLLOW_UPS if lang == "ja" else EN_FOLLOW_UPS)


def _check_character(character: str) -> None:
    if character not in CHARACTERS:
        raise ValueError(f"unknown character {character!r}; known: {', '.join(CHARACTERS)}")


def _rfc3339(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _session_starts(
    rng: random.Random, sessions: int, start: datetime, end: datetime, reserve: timedelta
) -> list[datetime]:
    """Session start times over ``[start, end - reserve)``, clustered so that sessions overlap like real traffic."""
    span = (end - reserve - start).total_seconds()
    if span <= 0:
        raise ValueError("the window is too short for a session")
    starts: list[datetime] = []
    for _ in range(sessions):
        if starts and rng.random() < 0.5:
            # Another user chatting at about the same time as an earlier one: their messages interleave.
            anchor = rng.choice(starts)
            moment = anchor + timedelta(seconds=rng.uniform(5, 240))
            if moment < end - reserve:
                starts.append(moment)
                continue
        starts.append(start + timedelta(seconds=rng.uniform(0, span)))
    return starts


def generate_history(
    character: str,
    *,
    sessions: int,
    seed: int,
    start: datetime,
    end: datetime,
    thumbs_down_rate: float = 0.1,
) -> list[dict]:
    """Messages of ``sessions`` chat sessions with ``character`` in ``[start, end)``, as the history API returns them.

    Each session has 2–6 exchanges on one topic (now and then switching to another). A share ``thumbs_down_rate`` of the
    assistant replies is off-voice and marked ``down``; about a third of the in-voice replies are marked ``up``; the
    rest carry no feedback. Messages are ordered by ``created_at`` and numbered from 1 in that order, so ``id`` order is
    acknowledgement order. The same arguments always give the same messages.
    """
    _check_character(character)
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    if not 0.0 <= thumbs_down_rate <= 1.0:
        raise ValueError("thumbs_down_rate must be within [0, 1]")
    rng = random.Random(f"{character}:{seed}")
    # Longest session: 6 exchanges of at most 20 s + 300 s each, plus the clustering offset.
    starts = _session_starts(rng, sessions, start, end, reserve=timedelta(seconds=6 * 320 + 240))
    off_voices = ["generic", *(c for c in CHARACTERS if c != character)]
    drafts: list[tuple[datetime, int, dict]] = []
    for index, moment in enumerate(starts):
        session_id = f"s-{character}-{seed}-{index:05d}"
        lang = "ja" if rng.random() < _JA_SHARE[character] else "en"
        topic = rng.choice(TOPICS)
        for turn in range(rng.randint(2, 6)):
            topic, prompt = _next_prompt(topic, lang, rng, turn)
            off_voice = rng.random() < thumbs_down_rate
            voice = rng.choice(off_voices) if off_voice else character
            answer = reply(voice, topic, lang, rng, turn)
            feedback = "down" if off_voice else ("up" if rng.random() < 0.35 else None)
            drafts.append((moment, len(drafts), _message(session_id, character, "user", prompt, None)))
            moment += timedelta(seconds=rng.uniform(1, 20))
            drafts.append((moment, len(drafts), _message(session_id, character, "assistant", answer, feedback)))
            moment += timedelta(seconds=rng.uniform(10, 300))
    drafts.sort(key=lambda item: (item[0], item[1]))
    messages = []
    for number, (moment, _, message) in enumerate(drafts, start=1):
        messages.append({"id": number, **message, "created_at": _rfc3339(moment)})
    return [_ordered(m) for m in messages]


def _message(session_id: str, character: str, role: str, content: str, feedback: str | None) -> dict:
    return {"session_id": session_id, "character": character, "role": role, "content": content, "feedback": feedback}


_FIELDS = ("id", "session_id", "character", "role", "content", "created_at", "feedback")


def _ordered(message: dict) -> dict:
    # Same key order as the contract's example, so JSON Lines files read naturally.
    return {field: message[field] for field in _FIELDS}


def user_turns(history: Iterable[dict]) -> list[tuple[str, str]]:
    """The user messages of ``history`` as ``(session_id, content)`` in ``id`` order, to replay through the chat API."""
    ordered = sorted(history, key=lambda m: m["id"])
    return [(m["session_id"], m["content"]) for m in ordered if m["role"] == "user"]


def write_jsonl(path: Path, messages: Iterable[dict]) -> Path:
    """Write ``messages`` as JSON Lines (the trainer's ``--history-file`` form) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for message in messages:
            handle.write(json.dumps(message, ensure_ascii=False) + "\n")
    return path


def carries_style(character: str, text: str) -> bool:
    """Whether ``text`` contains at least one of ``character``'s :data:`MARKERS`."""
    _check_character(character)
    lowered = text.lower()
    return any(marker in lowered for marker in MARKERS[character])


def style_score(character: str, replies: Sequence[str]) -> float:
    """Share of ``replies`` that carry at least one of ``character``'s :data:`MARKERS`, in ``[0, 1]`` (0 when empty)."""
    _check_character(character)
    if not replies:
        return 0.0
    return sum(carries_style(character, text) for text in replies) / len(replies)


def held_out_prompts(character: str) -> list[str]:
    """Prompts for before/after replies: built from templates that :func:`generate_history` never uses."""
    _check_character(character)
    rng = random.Random(f"held-out:{character}")
    topics = rng.sample(TOPICS, 8)
    prompts = [_opener(topic, "ja", rng, JA_HELD_OUT) for topic in topics[:6]]
    prompts += [_opener(topic, "en", rng, EN_HELD_OUT) for topic in topics[6:]]
    return prompts


def generic_dialogue(seed: int, count: int) -> list[tuple[str, str, str]]:
    """``count`` neutral ``(instruction, input, output)`` examples — the base model's pretraining dialogue.

    Instructions come from every prompt template (held-out ones included: the base model should answer those
    plainly too); follow-up questions carry the opening question as ``input``, like a multi-turn context.
    """
    rng = random.Random(f"generic:{seed}")
    openers = {"ja": JA_OPENERS + JA_HELD_OUT, "en": EN_OPENERS + EN_HELD_OUT}
    follow_ups = {"ja": JA_FOLLOW_UPS, "en": EN_FOLLOW_UPS}
    examples = []
    for _ in range(count):
        lang = "ja" if rng.random() < 0.6 else "en"
        topic = rng.choice(TOPICS)
        turn = rng.randint(0, 3)
        opener = _opener(topic, lang, rng, openers[lang])
        if turn and rng.random() < 0.5:
            instruction, context = rng.choice(follow_ups[lang]), opener
        else:
            instruction, context = opener, ""
        examples.append((instruction, context, reply("generic", topic, lang, rng, turn)))
    return examples


def generic_sessions(seed: int, count: int) -> list[list[tuple[str, str]]]:
    """``count`` neutral chat sessions, each a list of ``(role, text)`` turns — the base model's pretraining chats.

    Sessions run like :func:`generate_history`'s (an opener, follow-ups, now and then a new topic) but have 1–5
    exchanges, every reply in the generic voice, and openers from every template (held-out ones included).
    """
    rng = random.Random(f"generic-sessions:{seed}")
    openers = {"ja": JA_OPENERS + JA_HELD_OUT, "en": EN_OPENERS + EN_HELD_OUT}
    sessions = []
    for _ in range(count):
        lang = "ja" if rng.random() < 0.6 else "en"
        topic = rng.choice(TOPICS)
        turns: list[tuple[str, str]] = []
        for turn in range(rng.randint(1, 5)):
            topic, prompt = _next_prompt(topic, lang, rng, turn, openers[lang])
            turns += [("user", prompt), ("assistant", reply("generic", topic, lang, rng, turn))]
        sessions.append(turns)
    return sessions
