// hyperowl chat page: attach images or a video, ask, and read the answer as it streams (OpenAI SSE format).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // OpenAI messages of this conversation (media as data: URIs)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// Yields the JSON payloads of the server-sent events of a fetch response, up to "[DONE]".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
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

async function ask(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const files = Array.from($("files").files);
  if (!text && !files.length) return;
  $("send").disabled = true;
  const content = [];
  const shown = bubble("user", "");
  for (const file of files) {
    const url = await readAsDataURL(file);
    const isVideo = file.type.startsWith("video/");
    const media = document.createElement(isVideo ? "video" : "img");
    media.src = url;
    shown.appendChild(media);
    content.push(isVideo
      ? { type: "video_url", video_url: { url, max_frames: Number($("max-frames").value) || 16 } }
      : { type: "image_url", image_url: { url } });
  }
  if (text) {
    content.push({ type: "text", text });
    shown.appendChild(document.createTextNode(text));
  }
  const message = { role: "user", content };
  const answer = bubble("assistant", "");
  answer.dataset.done = "0";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        messages: [...conversation, message],
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value) || 256,
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) answer.textContent += delta.content;
    }
    conversation.push(message, { role: "assistant", content: answer.textContent });
    $("prompt").value = "";
    $("files").value = "";
    $("attached").textContent = "";
  } catch (err) {
    answer.className = "msg error";
    answer.textContent = "error: " + err.message;
    shown.remove();
  } finally {
    answer.dataset.done = "1";
    $("send").disabled = false;
  }
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.ok) $("model").textContent = (await response.json()).data[0].id;
  } catch (e) { /* the page still works without the model name */ }
}

$("ask").addEventListener("submit", ask);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("files").addEventListener("change", () => {
  $("attached").textContent = Array.from($("files").files).map((f) => f.name).join(", ");
});
$("clear").addEventListener("click", () => { conversation.length = 0; $("messages").textContent = ""; });
$("api-key").addEventListener("change", showModel);
showModel();
