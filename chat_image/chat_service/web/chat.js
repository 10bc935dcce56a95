// The chat page: pick a character, send messages, read the reply as it streams (SSE from
// /v1/chat/completions), rate each reply with POST /v1/feedback. Plain JS, no build step, no CDN.
"use strict";

const api = "..";  // the page is served at /ui/, the API at /v1/...
const state = { characters: new Map(), turns: [], session: null };
const $ = (id) => document.getElementById(id);

function say(text) { $("status").textContent = text; }

async function loadCharacters() {
  const response = await fetch(`${api}/v1/characters`);
  if (!response.ok) throw new Error(`characters: HTTP ${response.status}`);
  const { characters } = await response.json();
  const wanted = new URLSearchParams(location.search).get("character");
  for (const c of characters) {
    state.characters.set(c.name, c);
    $("character").append(new Option(`${c.display_name} (${c.name})`, c.name, false, c.name === wanted));
  }
  showCharacter();
}

function showCharacter() {
  const c = state.characters.get($("character").value);
  $("serving-version").textContent = c.adapter_version ?? "loading";
  $("character-link").href = `character.html?name=${encodeURIComponent(c.name)}`;
  // A new character is a new conversation.
  state.turns = [];
  state.session = null;
  $("conversation").replaceChildren();
}

function addUserTurn(text) {
  const item = document.createElement("li");
  item.className = "turn user";
  const speaker = document.createElement("p");
  speaker.className = "speaker";
  speaker.textContent = "You";
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(speaker, body);
  $("conversation").append(item);
}

function addReplyTurn(character) {
  const item = $("reply-template").content.firstElementChild.cloneNode(true);
  item.querySelector(".speaker").textContent = character.display_name;
  $("conversation").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

// Yields the JSON payload of each `data:` event of an SSE body, until `[DONE]`.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function streamReply(character, item) {
  const headers = { "Content-Type": "application/json" };
  if (state.session) headers["X-Session-Id"] = state.session;
  const body = { model: character.name, messages: state.turns, stream: true };
  const response = await fetch(`${api}/v1/chat/completions`, { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) throw new Error(`chat: HTTP ${response.status} ${await response.text()}`);
  state.session = response.headers.get("X-Session-Id");
  const text = item.querySelector(".text");
  let final = null;
  for await (const chunk of sseEvents(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    const delta = chunk.choices[0].delta.content;
    if (delta) text.textContent += delta;
    if (chunk.message_id !== undefined) final = chunk;
  }
  if (final === null) throw new Error("the stream ended without a final chunk");
  return final;
}

function offerThumbs(item, messageId) {
  const thumbs = item.querySelector(".thumbs");
  thumbs.hidden = false;
  for (const button of thumbs.querySelectorAll("button")) {
    button.addEventListener("click", () => rate(thumbs, button, messageId));
  }
}

async function rate(thumbs, button, messageId) {
  const feedback = button.dataset.rating;
  const response = await fetch(`${api}/v1/feedback`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ message_id: messageId, feedback }),
  });
  if (!response.ok) { say(`feedback not stored: HTTP ${response.status}`); return; }
  for (const other of thumbs.querySelectorAll("button")) other.setAttribute("aria-pressed", String(other === button));
  thumbs.dataset.stored = feedback;
}

async function send(event) {
  event.preventDefault();
  const message = $("message").value.trim();
  if (!message) return;
  const character = state.characters.get($("character").value);
  $("send").disabled = true;
  say("");
  addUserTurn(message);
  $("message").value = "";
  state.turns.push({ role: "user", content: message });
  const item = addReplyTurn(character);
  try {
    const final = await streamReply(character, item);
    const reply = item.querySelector(".text").textContent;
    state.turns.push({ role: "assistant", content: reply });
    item.querySelector(".version").textContent = `adapter ${final.adapter_version}`;
    item.dataset.messageId = final.message_id;
    offerThumbs(item, final.message_id);
  } catch (error) {
    state.turns.pop();
    say(String(error.message || error));
    item.remove();
  } finally {
    item.querySelector(".text").setAttribute("aria-busy", "false");
    $("send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("character").addEventListener("change", showCharacter);
  $("composer").addEventListener("submit", send);
  loadCharacters().catch((error) => say(String(error.message || error)));
});
