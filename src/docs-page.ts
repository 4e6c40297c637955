/**
 * The API reference page served at /docs: one self-contained HTML page (inline style and script, nothing
 * fetched from elsewhere) that reads /openapi.json and renders its routes, parameters, bodies, examples,
 * responses and schemas. Kept as a string so that every runtime (Bun, Node, Deno, Deno Deploy) serves it
 * without reading files.
 */
export const DOCS_PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ultralong-serve API reference</title>
<link rel="icon" href="data:,">
<style>
  :root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --bg: #fff; --side: #f6f7f9; --code: #f3f4f7; --accent: #2456c7; }
  @media (prefers-color-scheme: dark) { :root { --fg: #e3e6ec; --muted: #9aa3b2; --line: #323846; --bg: #161a22; --side: #1c212b; --code: #222836; --accent: #7aa2ff; } }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); display: flex; }
  nav { position: sticky; top: 0; height: 100vh; overflow-y: auto; width: 300px; flex: none; background: var(--side); border-right: 1px solid var(--line); padding: 16px; font-size: 13px; }
  nav h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); margin: 18px 0 6px; }
  nav a { display: block; color: var(--fg); text-decoration: none; padding: 2px 0; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  nav a:hover { color: var(--accent); }
  main { flex: 1; min-width: 0; padding: 24px 40px 80px; max-width: 1100px; }
  h1 { margin: 0 0 4px; font-size: 26px; }
  h3.tag { margin-top: 40px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
  section.op { border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px; margin: 18px 0; }
  .route { font: 600 15px ui-monospace, SFMono-Regular, Menlo, monospace; display: flex; gap: 10px; align-items: center; flex-wrap: wrap; }
  .method { color: #fff; border-radius: 4px; padding: 1px 8px; font-size: 12px; text-transform: uppercase; }
  .get { background: #2f7d4f; } .post { background: #2456c7; } .put { background: #a4661b; } .delete { background: #b23b3b; }
  .summary { color: var(--muted); font-weight: normal; font-family: system-ui, sans-serif; }
  .badge { font-size: 11px; border: 1px solid var(--line); border-radius: 10px; padding: 0 8px; color: var(--muted); font-family: system-ui, sans-serif; font-weight: normal; }
  h4 { margin: 14px 0 6px; font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
  table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
  td, th { text-align: left; vertical-align: top; padding: 4px 8px; border-bottom: 1px solid var(--line); }
  th { font-weight: 600; color: var(--muted); font-size: 12px; }
  code, pre, .type { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; }
  .type { color: var(--accent); }
  .req { color: #c0392b; font-size: 11px; }
  pre { background: var(--code); padding: 10px 12px; border-radius: 6px; overflow-x: auto; margin: 6px 0; }
  details { margin: 4px 0; } summary { cursor: pointer; }
  a.ref { color: var(--accent); }
  .status { font-weight: 600; font-family: ui-monospace, monospace; }
  .muted { color: var(--muted); }
  #error { color: #c0392b; }
</style>
</head>
<body>
<nav id="nav"><strong>ultralong-serve</strong></nav>
<main id="main"><h1>API reference</h1><p class="muted" id="status">Loading openapi.json ...</p></main>
<script>
(function () {
  "use strict";
  var main = document.getElementById("main");
  var nav = document.getElementById("nav");
  var doc;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "class") node.className = attrs[k]; else node.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }
  function refName(ref) { return ref.split("/").pop(); }
  function resolve(schema) {
    var seen = 0;
    while (schema && schema.$ref && seen++ < 20) schema = doc.components.schemas[refName(schema.$ref)];
    return schema || {};
  }
  function refLink(ref) { var n = refName(ref); return el("a", { class: "ref", href: "#schema-" + n }, [n]); }

  /** A short type label: links for refs, unions joined by |, constraints in words. */
  function typeOf(schema) {
    if (!schema) return el("span", { class: "type" }, ["any"]);
    if (schema.$ref) return el("span", { class: "type" }, [refLink(schema.$ref)]);
    var parts = [];
    var union = schema.anyOf || schema.oneOf;
    if (union) {
      var span = el("span", { class: "type" });
      union.forEach(function (s, i) { if (i) span.appendChild(document.createTextNode(" | ")); span.appendChild(typeOf(s)); });
      return span;
    }
    var t = schema.type;
    if (Array.isArray(t)) parts.push(t.join(" | "));
    else if (t === "array") {
      var a = el("span", { class: "type" }, ["array of "]);
      a.appendChild(typeOf(schema.items));
      return withLimits(a, schema);
    } else if (t) parts.push(t);
    if (schema.const !== undefined) parts = [JSON.stringify(schema.const)];
    if (schema.enum) parts = [schema.enum.map(function (v) { return JSON.stringify(v); }).join(" | ")];
    if (!parts.length) parts.push(schema.properties ? "object" : "any");
    return withLimits(el("span", { class: "type" }, [parts.join(" ")]), schema);
  }
  function withLimits(node, s) {
    var l = [];
    if (s.minimum !== undefined && Math.abs(s.minimum) < 1e15) l.push(">= " + s.minimum);
    if (s.exclusiveMinimum !== undefined) l.push("> " + s.exclusiveMinimum);
    if (s.maximum !== undefined && Math.abs(s.maximum) < 1e15) l.push("<= " + s.maximum);
    if (s.exclusiveMaximum !== undefined) l.push("< " + s.exclusiveMaximum);
    if (s.minItems !== undefined) l.push("min " + s.minItems + " items");
    if (s.maxItems !== undefined) l.push("max " + s.maxItems + " items");
    if (s.minLength !== undefined) l.push("min length " + s.minLength);
    if (s.pattern) l.push("pattern " + s.pattern);
    if (s.default !== undefined) l.push("default " + JSON.stringify(s.default));
    if (s.propertyNames && s.propertyNames.pattern) l.push("keys " + s.propertyNames.pattern);
    if (l.length) node.appendChild(el("span", { class: "muted" }, [" (" + l.join(", ") + ")"]));
    return node;
  }

  /** The fields of an object schema (through refs and nullable unions), nested objects indented. */
  function fieldRows(schema, depth, rows, prefix) {
    var s = resolve(schema);
    var union = s.anyOf || s.oneOf;
    if (union) { union.forEach(function (u) { if (!u.$ref) fieldRows(u, depth, rows, prefix); }); return rows; }
    if (s.type === "array" && s.items && !s.items.$ref) return fieldRows(s.items, depth, rows, prefix + "[].");
    var props = s.properties || {};
    var required = s.required || [];
    Object.keys(props).forEach(function (name) {
      var p = props[name];
      rows.push(el("tr", null, [
        el("td", null, [el("code", { style: "padding-left:" + depth * 16 + "px" }, [prefix + name]), required.indexOf(name) >= 0 ? el("span", { class: "req" }, [" required"]) : null]),
        el("td", null, [typeOf(p)]),
        el("td", null, [p.description || ""]),
      ]));
      if (depth < 3 && !p.$ref) fieldRows(p, depth + 1, rows, "");
    });
    return rows;
  }
  function fieldsTable(schema) {
    var rows = fieldRows(schema, 0, [], "");
    if (!rows.length) return el("p", null, [typeOf(schema)]);
    return el("table", null, [el("tr", null, [el("th", null, ["Field"]), el("th", null, ["Type"]), el("th", null, ["Description"])])].concat(rows));
  }

  function curlOf(method, path, example) {
    var line = "curl";
    if (method !== "get") line += " -X " + method.toUpperCase();
    line += " " + location.origin + path;
    if (doc.security && doc.security.length) line += ' \\\\\\n  -H "Authorization: Bearer $API_KEY"';
    if (example !== undefined) line += " \\\\\\n  -H 'content-type: application/json' -d '" + JSON.stringify(example).replace(/'/g, "'\\\\''") + "'";
    return line;
  }

  function operation(path, method, op) {
    var id = "op-" + (op.operationId || method + path);
    var auth = op.security && op.security.length === 0 ? "no key needed" : op.security ? "key optional" : doc.security ? "Bearer key" : null;
    var section = el("section", { class: "op", id: id }, [
      el("div", { class: "route" }, [el("span", { class: "method " + method }, [method]), el("span", null, [path]), el("span", { class: "summary" }, [op.summary || ""]), auth ? el("span", { class: "badge" }, [auth]) : null]),
      op.description ? el("p", null, [op.description]) : null,
    ]);
    if (op.parameters && op.parameters.length) {
      section.appendChild(el("h4", null, ["Parameters"]));
      section.appendChild(el("table", null, op.parameters.map(function (p) {
        return el("tr", null, [el("td", null, [el("code", null, [p.name])]), el("td", null, [p.in]), el("td", null, [typeOf(p.schema)]), el("td", null, [p.description || ""])]);
      })));
    }
    var body = op.requestBody;
    if (body) {
      section.appendChild(el("h4", null, ["Request body" + (body.required === false ? " (optional)" : "")]));
      if (body.description) section.appendChild(el("p", null, [body.description]));
      Object.keys(body.content).forEach(function (type) {
        var media = body.content[type];
        section.appendChild(el("p", null, [el("code", null, [type]), " ", media.schema && media.schema.$ref ? refLink(media.schema.$ref) : ""]));
        if (type === "application/json" && media.schema) section.appendChild(fieldsTable(media.schema));
        var examples = media.examples || {};
        Object.keys(examples).forEach(function (name) {
          var ex = examples[name];
          section.appendChild(el("details", null, [
            el("summary", null, ["Example: " + (ex.summary || name)]),
            el("pre", null, [JSON.stringify(ex.value, null, 2)]),
            el("pre", null, [curlOf(method, path, ex.value)]),
          ]));
        });
      });
    } else {
      section.appendChild(el("details", null, [el("summary", null, ["Example"]), el("pre", null, [curlOf(method, path)])]));
    }
    section.appendChild(el("h4", null, ["Responses"]));
    var rows = Object.keys(op.responses).map(function (status) {
      var r = op.responses[status];
      var types = Object.keys(r.content || {}).map(function (type) {
        var media = r.content[type];
        var parts = [el("code", null, [type]), " "];
        if (media.schema) parts.push(typeOf(media.schema));
        if (media["x-sse-data"]) { parts.push(el("span", { class: "muted" }, [" events: "])); parts.push(typeOf(media["x-sse-data"])); }
        return el("div", null, parts);
      });
      return el("tr", null, [el("td", { class: "status" }, [status]), el("td", null, [r.description || ""]), el("td", null, types)]);
    });
    section.appendChild(el("table", null, rows));
    return section;
  }

  function render() {
    main.textContent = "";
    main.appendChild(el("h1", null, [doc.info.title + " API"]));
    main.appendChild(el("p", { class: "muted" }, ["OpenAPI " + doc.openapi + ", version " + doc.info.version + ". ", el("a", { href: "openapi.json" }, ["openapi.json"])]));
    main.appendChild(el("p", null, [doc.info.description || ""]));
    var byTag = {};
    Object.keys(doc.paths).forEach(function (path) {
      Object.keys(doc.paths[path]).forEach(function (method) {
        var op = doc.paths[path][method];
        var tag = (op.tags && op.tags[0]) || "Other";
        (byTag[tag] = byTag[tag] || []).push([path, method, op]);
      });
    });
    var tags = (doc.tags || []).map(function (t) { return t.name; });
    Object.keys(byTag).forEach(function (t) { if (tags.indexOf(t) < 0) tags.push(t); });
    tags.forEach(function (tag) {
      var ops = byTag[tag];
      if (!ops) return;
      nav.appendChild(el("h2", null, [tag]));
      main.appendChild(el("h3", { class: "tag" }, [tag]));
      ops.forEach(function (o) {
        var section = operation(o[0], o[1], o[2]);
        main.appendChild(section);
        nav.appendChild(el("a", { href: "#" + section.id }, [o[1].toUpperCase() + " " + o[0]]));
      });
    });
    nav.appendChild(el("h2", null, ["Schemas"]));
    main.appendChild(el("h3", { class: "tag" }, ["Schemas"]));
    Object.keys(doc.components.schemas).forEach(function (name) {
      var s = doc.components.schemas[name];
      nav.appendChild(el("a", { href: "#schema-" + name }, [name]));
      main.appendChild(el("section", { class: "op", id: "schema-" + name }, [
        el("div", { class: "route" }, [el("span", null, [name])]),
        s.description ? el("p", null, [s.description]) : null,
        fieldsTable(s),
        el("details", null, [el("summary", null, ["JSON Schema"]), el("pre", null, [JSON.stringify(s, null, 2)])]),
      ]));
    });
    if (location.hash) { var target = document.getElementById(location.hash.slice(1)); if (target) target.scrollIntoView(); }
  }

  fetch("openapi.json").then(function (r) {
    if (!r.ok) throw new Error("openapi.json answered " + r.status);
    return r.json();
  }).then(function (d) { doc = d; render(); }).catch(function (e) {
    var s = document.getElementById("status");
    s.id = "error";
    s.textContent = "Could not load openapi.json: " + e.message;
  });
})();
</script>
</body>
</html>
`;
