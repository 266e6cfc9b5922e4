// Progress lines (a pull's bytes, a snapshot's steps) go to the controller at most once an interval:
// the newest held back goes when the interval is over, and none is lost at the end (flush).

export class Throttle {
  private last = -Infinity;
  private held?: string;
  private timer?: NodeJS.Timeout;
  private readonly send: (message: string) => void;
  private readonly everyMs: number;

  constructor(send: (message: string) => void, everyMs: number) {
    this.send = send;
    this.everyMs = everyMs;
  }

  push(message: string) {
    const wait = this.last + this.everyMs - Date.now();
    if (wait <= 0) return this.emit(message);
    this.held = message;
    // The timer sends what is held then, without asking the clock again: a timer may fire a little
    // before Date.now() says its time is up (libuv counts from the start of the loop's turn), and a
    // message held again at that moment was lost (the line before a template's boot, in CI).
    this.timer ??= setTimeout(() => {
      this.timer = undefined;
      if (this.held !== undefined) this.emit(this.held);
    }, wait);
  }

  /** Sends what is held now. */
  flush() {
    if (this.held !== undefined) this.emit(this.held);
  }

  /** Drops what is held. */
  cancel() {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.held = undefined;
  }

  private emit(message: string) {
    this.cancel();
    this.last = Date.now();
    this.send(message);
  }
}
