// The page's CSP lets in <style> elements only with this response's nonce. The terminal emulator
// makes some (its theme and cell sizes): every <style> element made in this page gets the nonce,
// which the page finds in its own <meta> (a markup injection could not know it).
const nonce = document.querySelector<HTMLMetaElement>('meta[name="orchard-style-nonce"]')?.content ?? '';
const createElement = Document.prototype.createElement;
Document.prototype.createElement = function (this: Document, tagName: string, options?: ElementCreationOptions) {
  const element = createElement.call(this, tagName, options);
  if (tagName.toLowerCase() === 'style') element.setAttribute('nonce', nonce);
  return element;
} as typeof Document.prototype.createElement;
