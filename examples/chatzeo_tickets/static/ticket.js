// The live part of a ticket page: new messages arrive by Server-Sent Events, posts go
// by fetch. Message text is untrusted: it is only ever set as textContent.
"use strict";
(function () {
  const body = document.body;
  const list = document.getElementById("messages");
  const live = document.getElementById("live");
  const error = document.getElementById("error");

  function add(message) {
    if (list.querySelector(`li[data-key="${message.key}"]`)) return; // shown already
    const item = document.createElement("li");
    item.dataset.key = String(message.key);
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = message.author || "(anonymous)";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = message.text;
    item.append(author, " ", text);
    list.append(item);
    list.scrollTop = list.scrollHeight;
  }

  // The stream starts after the last message the page was rendered with; after a
  // reconnect the browser itself sends Last-Event-ID, the key of the last event.
  const source = new EventSource(`${body.dataset.events}?after=${body.dataset.after}`);
  source.onopen = () => { live.textContent = "live"; };
  source.onerror = () => { live.textContent = "reconnecting…"; };
  source.onmessage = (event) => add(JSON.parse(event.data));
  // Leaving the page ends the stream at once (the server frees its thread), also when
  // the browser keeps the page in its back/forward cache; coming back reloads it.
  window.addEventListener("pagehide", () => source.close());
  window.addEventListener("pageshow", (event) => { if (event.persisted) location.reload(); });

  // Remember the name between pages, in every form that asks for it.
  const names = document.querySelectorAll("input[name=name]");
  const saved = localStorage.getItem("chatzeo-name");
  names.forEach((input) => {
    if (saved && !input.value) input.value = saved;
    input.addEventListener("change", () => localStorage.setItem("chatzeo-name", input.value));
  });

  const form = document.getElementById("post");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const data = new FormData(form);
    localStorage.setItem("chatzeo-name", data.get("name"));
    const response = await fetch(form.action, {
      method: "POST", body: data, headers: { Accept: "application/json" },
    }).catch(() => null);
    if (response && response.ok) {
      form.elements.text.value = ""; // the message itself arrives through the stream
      form.elements.text.focus();
    } else {
      const answer = response ? await response.json().catch(() => ({})) : {};
      error.textContent = answer.error || "not sent: the server did not answer";
    }
  });
})();
